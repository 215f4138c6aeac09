"""Every benchmark task selfprompt knows, in one shape: VTAB-1k (19), FGVC (5), offline VTAB-mini (8)."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

from selfprompt.data import fgvc, vtab, vtab_mini

BENCHMARKS = ("vtab-1k", "fgvc", "vtab-mini")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


@dataclass(frozen=True)
class TaskInfo:
    """A task as training, checking and benchmark tables see it.

    Attributes:
        name: The task's name within its benchmark (``--data.task``, ``selfprompt bench --tasks``).
        benchmark: vtab-1k, fgvc or vtab-mini.
        group: natural, specialized or structured (VTAB), or fgvc.
        num_classes: Classes of the task's head.
        labels: What a label means.
        folder: The task's folder under a benchmark root.
        splits: The list files of the protocol: train, val, train+val, test.
        counts: Images per split that ``data check`` expects (a split absent here is checked against the
            folder's own manifest, if it has one).
        source: Where the data comes from.
    """

    name: str
    benchmark: str
    group: str
    num_classes: int
    labels: str
    folder: str
    splits: tuple[str, str, str, str] = VTAB_SPLITS
    counts: dict[str, int] = field(default_factory=dict)
    source: str = ""


@functools.cache
def _tasks() -> dict[str, dict[str, TaskInfo]]:
    return {
        "vtab-1k": {
            t.name: TaskInfo(t.name, "vtab-1k", t.group, t.num_classes, t.labels, t.folder,
                             counts=vtab.expected_counts(t), source=f"TFDS {t.tfds}")
            for t in vtab.TASKS.values()
        },
        "fgvc": {
            d.name: TaskInfo(d.name, "fgvc", "fgvc", d.num_classes, d.label_meaning,
                             f"{fgvc.ROOT_FOLDERS[d.name]}/{fgvc.OUTPUT_DIR}", splits=fgvc.LIST_SPLITS,
                             counts=fgvc.expected_counts(d), source=d.homepage)
            for d in fgvc.DATASETS.values()
        },
        "vtab-mini": {
            t.name: TaskInfo(t.name, "vtab-mini", t.group, t.num_classes, t.source, t.name, source=t.source)
            for t in vtab_mini.TASKS.values()
        },
    }  # fmt: skip


def tasks(benchmark: str) -> dict[str, TaskInfo]:
    """The tasks of ``benchmark`` by name, in the benchmark's order."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; benchmarks: {list(BENCHMARKS)}.")
    return _tasks()[benchmark]


def task(benchmark: str, name: str) -> TaskInfo:
    known = tasks(benchmark)
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"Unknown {benchmark} task {name!r}{hint} Tasks: {list(known)}.")
    return known[name]


def groups(benchmark: str) -> tuple[str, ...]:
    """The benchmark's groups, in table order."""
    return ("fgvc",) if benchmark == "fgvc" else vtab.GROUPS
