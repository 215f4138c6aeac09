"""Tables and a plot from finished bench cells: per-task accuracy, VTAB group means and both VTAB means,
each as mean +- standard deviation over seeds (an aggregate is taken per seed, then over seeds)."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selfprompt.apps.paper import SOURCES, TASK_MEAN, quoted
from selfprompt.apps.stats import comparison_table
from selfprompt.atomic import write_text
from selfprompt.data import registry

VTAB_MEAN = "VTAB mean (of group means)"


def overall(benchmark: str) -> str:
    """The column of the mean over tasks: the one group's mean where the benchmark has one group."""
    groups = registry.groups(benchmark)
    return groups[0] if len(groups) == 1 else TASK_MEAN


def _spread(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(
    rows: list[dict[str, Any]], benchmark: str = "vtab-mini"
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(backbone, variant) -> {task or aggregate name: (mean, std over seeds, seeds)}: per task, per group,
    the mean of group means (VTAB) and the mean over tasks, each computed per seed, then over seeds."""
    tasks_of = registry.tasks(benchmark)
    groups_of = registry.groups(benchmark)
    acc: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[(r["backbone"], r["variant"])][r["seed"]][r["task"]] = 100 * r["test_acc"]
    table = {}
    for key, by_seed in acc.items():
        tasks = {t for per_task in by_seed.values() for t in per_task}
        columns: dict[str, list[float]] = defaultdict(list)
        for per_task in by_seed.values():
            for task, value in per_task.items():
                columns[task].append(value)
            if set(per_task) != set(tasks):
                continue  # an aggregate needs every task of this seed
            groups = {
                g: statistics.fmean(v for t, v in per_task.items() if tasks_of[t].group == g)
                for g in groups_of
                if any(tasks_of[t].group == g for t in per_task)
            }
            for g, v in groups.items():
                columns[g].append(v)
            if len(groups_of) > 1:  # one group (FGVC): its mean is the mean over tasks
                columns[VTAB_MEAN].append(statistics.fmean(groups.values()))
                columns[TASK_MEAN].append(statistics.fmean(per_task.values()))
        table[key] = {name: _spread(values) for name, values in columns.items()}
    return table


def markdown(rows: list[dict[str, Any]], benchmark: str) -> str:
    """Per backbone: tasks, groups and means as rows, variants as columns, each followed by the published
    number (``<variant> (paper)``) where :mod:`selfprompt.apps.paper` quotes one."""
    table = aggregate(rows, benchmark)
    tasks_of = registry.tasks(benchmark)
    params: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:  # the head's size follows each task's classes: report the mean over tasks
        params[(r["backbone"], r["variant"])].append((r["trainable_parameters"], r["trainable_share"]))
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    lines = []
    for backbone in backbones:
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["backbone"] == backbone))
        tasks = [t for t in tasks_of if any(r["task"] == t and r["backbone"] == backbone for r in rows)]
        seeds = sorted({r["seed"] for r in rows if r["backbone"] == backbone})
        paper = {v: quoted(benchmark, backbone, v) for v in variants}
        headers = [h for v in variants for h in [v, *([f"{v} (paper)"] if paper[v] else [])]]
        lines += [
            f"### {backbone}",
            "",
            f"Test accuracy (%), mean ± std over seeds {seeds}."
            + (f" (paper): {SOURCES}" if any(paper.values()) else ""),
            "",
            "| task | " + " | ".join(headers) + " |",
            "| --- |" + " ---: |" * len(headers),
        ]
        extra = [VTAB_MEAN, TASK_MEAN] if len(registry.groups(benchmark)) > 1 else []
        for name in [*tasks, *registry.groups(benchmark), *extra]:
            cells = [table[(backbone, v)].get(name) for v in variants]
            if all(c is None for c in cells):
                continue
            label = f"{name} ({tasks_of[name].group})" if name in tasks_of else f"**{name}**"
            shown = []
            for v, c in zip(variants, cells, strict=True):
                shown.append("–" if c is None else f"{c[0]:.2f} ± {c[1]:.2f}")
                if paper[v]:
                    shown.append(f"{paper[v][name]:.2f}" if name in paper[v] else "–")
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
        shares = [
            (
                statistics.fmean(n for n, _ in params[(backbone, v)]),
                statistics.fmean(s for _, s in params[(backbone, v)]),
            )
            for v in variants
        ]
        shown = [
            x
            for v, (n, share) in zip(variants, shares, strict=True)
            for x in [f"{n:,.0f} ({100 * share:.2f}%)", *(["–"] if paper[v] else [])]
        ]
        lines.append("| trainable parameters (mean over tasks) | " + " | ".join(shown) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    """Every column any row has (cells written by an older selfprompt lack the newer ones: left blank)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(rows: list[dict[str, Any]], path: Path, benchmark: str) -> bool:
    """Mean test accuracy over tasks per method and backbone (error bars: std over seeds); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = aggregate(rows, benchmark)
    mean = overall(benchmark)
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(variants) * len(backbones), 4))
    width = 0.8 / len(backbones)
    for b, backbone in enumerate(backbones):
        stats = [table.get((backbone, v), {}).get(mean, (float("nan"), 0.0, 0)) for v in variants]
        xs = [i + (b - (len(backbones) - 1) / 2) * width for i in range(len(variants))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=backbone)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("test accuracy, mean over tasks (%)")
    ax.set_title(registry.benchmark(benchmark).title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], out: Path, cfg: Any, benchmark: str) -> list[Path]:
    """``results.md`` (tables), ``cells.csv`` (one line per cell) and ``results.png``; returns the paths."""
    if not rows:
        return []
    written = []
    command = " ".join(["selfprompt", *sys.argv[1:]])
    settings = json.dumps(asdict(cfg))
    text = (
        f"# {registry.benchmark(benchmark).title} bench\n\n{len(rows)} cells; command `{command}`; resolved "
        f"settings `{settings}`.\n\n{markdown(rows, benchmark)}\n## Paired differences\n\nTest accuracy of a "
        f"minus b on the cells both ran (backbone x task x seed), with a seeded percentile-bootstrap 95% "
        f"interval over those cells (`selfprompt.apps.stats`).\n\n{comparison_table(rows)}\n"
    )
    for name, content in (("results.md", text), ("cells.csv", _csv(rows))):
        write_text(out / name, content)
        written.append(out / name)
    if plot(rows, out / "results.png", benchmark):
        written.append(out / "results.png")
    return written
