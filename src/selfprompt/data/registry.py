"""The benchmarks selfprompt knows and their tasks, in one shape.

A benchmark is one module of this package that calls :func:`register_benchmark` with a :class:`Benchmark`:
its name, groups, list files, recipe folder, ``prepare`` and ``check``; ``selfprompt data``, the config
check, splits, bench and its tables ask this registry, never for a benchmark by name. The package imports
every benchmark module (``selfprompt/data/__init__.py``): VTAB-1k (19 tasks, ``vtab.py``), FGVC (5,
``fgvc.py``) and the offline VTAB-mini (8, ``vtab_mini.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


@dataclass(frozen=True)
class TaskInfo:
    """A task as training, checking and benchmark tables see it.

    Attributes:
        name: The task's name within its benchmark (``--data.task``, ``selfprompt bench --tasks``).
        benchmark: The registered benchmark it belongs to.
        group: One of its benchmark's groups (VTAB's natural, specialized or structured).
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


@dataclass
class PrepareOptions:
    """What ``selfprompt data prepare`` passes a benchmark's ``prepare``; each reads the options it names in
    :attr:`Benchmark.prepare_options`.

    Attributes:
        root: The folder to write.
        tasks: The tasks to write (None: all).
        data_dir: TensorFlow Datasets' data folder.
        task: The one task to write.
        source: The extracted official archive's folder.
        splits: Where train/val come from (official or vpt).
        json_dir: VPT's JSON split files.
        val_fraction: Seeded val share of train.
        seed: Seed of the val split.
        out: Where the lists go.
    """

    root: str | None = None
    tasks: list[str] | None = None
    data_dir: str | None = None
    task: str | None = None
    source: str | None = None
    splits: str = "official"
    json_dir: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    out: str | None = None


Prepare = Callable[[PrepareOptions, Callable[[str], None]], None]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: what ``data list/prepare/check``, the config check, splits and bench ask of it.

    Attributes:
        name: How the CLI, configs (``data.benchmark``) and run records spell it.
        title: How tables and plots title it.
        groups: Its task groups, in table order (one group: the group's mean is the mean over tasks).
        splits: The protocol's list files: tune trains on the first and selects on the second; final trains
            on the third and tests once on the fourth.
        load_tasks: Its tasks by name, in the benchmark's order (called once, then kept).
        prepare: ``prepare(options, log)``: writes its list layout (``selfprompt data prepare NAME``).
        prepare_options: The :class:`PrepareOptions` fields its ``prepare`` reads (the CLI's help says so).
        check: ``check(folder, task)``: the command that rebuilds a task folder, the fix ``selfprompt data
            check`` names for each problem.
        recipes: The folder of its recipes (``selfprompt bench``).
        recipe_backbones: The backbones ``recipes`` holds a folder of recipes for
            (``<recipes>/<backbone>/<method>.yaml``); empty: one recipe per method
            (``<recipes>/<method>.yaml``) run on any timm backbone (``--model.backbone``; default: the zoo's).
        check_before_training: Every run checks a prepared task folder against its manifest's hashes first.
        order: Position in listings (``selfprompt data list``, the CLI's help).
    """

    name: str
    title: str
    groups: tuple[str, ...]
    splits: tuple[str, str, str, str]
    load_tasks: Callable[[], dict[str, TaskInfo]]
    prepare: Prepare
    prepare_options: tuple[str, ...]
    check: Callable[[Path, TaskInfo], str]
    recipes: str
    recipe_backbones: tuple[str, ...] = ()
    check_before_training: bool = False
    order: int = 100

    @property
    def tune_splits(self) -> tuple[str, str]:
        return self.splits[0], self.splits[1]

    @property
    def final_splits(self) -> tuple[str, str]:
        return self.splits[2], self.splits[3]


_BENCHMARKS: dict[str, Benchmark] = {}
_TASKS: dict[str, dict[str, TaskInfo]] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add ``benchmark`` to the registry (a second registration of a name is an error)."""
    if benchmark.name in _BENCHMARKS:
        raise ValueError(f"Benchmark {benchmark.name!r} is already registered.")
    _BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def unregister_benchmark(name: str) -> None:
    """Remove a registered benchmark (tests register and remove their own)."""
    _BENCHMARKS.pop(name, None)
    _TASKS.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered benchmarks' names, in listing order."""
    return tuple(b.name for b in sorted(_BENCHMARKS.values(), key=lambda b: b.order))


def spelled(joiner: str = "or") -> str:
    """The names as a sentence: ``vtab-1k, fgvc or vtab-mini``."""
    known = names()
    return f"{', '.join(known[:-1])} {joiner} {known[-1]}" if len(known) > 1 else ", ".join(known)


def titles() -> list[str]:
    """The registered benchmarks' titles, in listing order."""
    return [_BENCHMARKS[name].title for name in names()]


def benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; an unknown name is an error listing the known ones."""
    if name not in _BENCHMARKS:
        close = difflib.get_close_matches(str(name), list(_BENCHMARKS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise ValueError(f"Unknown benchmark {name!r}{hint} benchmarks: {list(names())}.")
    return _BENCHMARKS[name]


def tasks(name: str) -> dict[str, TaskInfo]:
    """The tasks of benchmark ``name`` by name, in the benchmark's order."""
    found = benchmark(name)
    if name not in _TASKS:
        _TASKS[name] = found.load_tasks()
    return _TASKS[name]


def task(benchmark_name: str, name: str) -> TaskInfo:
    known = tasks(benchmark_name)
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"Unknown {benchmark_name} task {name!r}{hint} Tasks: {list(known)}.")
    return known[name]


def groups(name: str) -> tuple[str, ...]:
    """The benchmark's groups, in table order."""
    return benchmark(name).groups


def of_manifest(manifest: dict) -> Benchmark | None:
    """The registered benchmark a prepared folder's manifest names (None: it names none that is known)."""
    return _BENCHMARKS.get(manifest.get("benchmark"))
