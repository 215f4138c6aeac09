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

from selfprompt.checkpoint import atomic_write
from selfprompt.data.vtab_mini import GROUPS, TASKS

VTAB_MEAN = "VTAB mean (of group means)"
TASK_MEAN = "mean over tasks"


def _spread(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(backbone, variant) -> {task or aggregate name: (mean, std over seeds, seeds)}."""
    acc: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[(r["backbone"], r["variant"])][r["seed"]][r["task"]] = 100 * r["test_acc"]
    table = {}
    for key, by_seed in acc.items():
        tasks = sorted({t for per_task in by_seed.values() for t in per_task}, key=list(TASKS).index)
        columns: dict[str, list[float]] = defaultdict(list)
        for per_task in by_seed.values():
            for task, value in per_task.items():
                columns[task].append(value)
            if set(per_task) != set(tasks):
                continue  # an aggregate needs every task of this seed
            groups = {
                g: statistics.fmean(v for t, v in per_task.items() if TASKS[t].group == g)
                for g in GROUPS
                if any(TASKS[t].group == g for t in per_task)
            }
            for g, v in groups.items():
                columns[g].append(v)
            columns[VTAB_MEAN].append(statistics.fmean(groups.values()))
            columns[TASK_MEAN].append(statistics.fmean(per_task.values()))
        table[key] = {name: _spread(values) for name, values in columns.items()}
    return table


def markdown(rows: list[dict[str, Any]]) -> str:
    table = aggregate(rows)
    params: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:  # the head's size follows each task's classes: report the mean over tasks
        params[(r["backbone"], r["variant"])].append((r["trainable_parameters"], r["trainable_share"]))
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    lines = []
    for backbone in backbones:
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["backbone"] == backbone))
        tasks = [t for t in TASKS if any(r["task"] == t and r["backbone"] == backbone for r in rows)]
        seeds = sorted({r["seed"] for r in rows if r["backbone"] == backbone})
        lines += [
            f"### {backbone}",
            "",
            f"Test accuracy (%), mean ± std over seeds {seeds}.",
            "",
            "| task | " + " | ".join(variants) + " |",
            "| --- |" + " ---: |" * len(variants),
        ]
        names = [*tasks, *GROUPS, VTAB_MEAN, TASK_MEAN]
        for name in names:
            cells = [table[(backbone, v)].get(name) for v in variants]
            if all(c is None for c in cells):
                continue
            label = f"{name} ({TASKS[name].group})" if name in TASKS else f"**{name}**"
            shown = ["–" if c is None else f"{c[0]:.2f} ± {c[1]:.2f}" for c in cells]
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
        shares = [
            (
                statistics.fmean(n for n, _ in params[(backbone, v)]),
                statistics.fmean(s for _, s in params[(backbone, v)]),
            )
            for v in variants
        ]
        lines.append(
            "| trainable parameters (mean over tasks) | "
            + " | ".join(f"{n:,.0f} ({100 * s:.2f}%)" for n, s in shares)
            + " |"
        )
        lines.append("")
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Mean test accuracy over tasks per method and backbone (error bars: std over seeds); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = aggregate(rows)
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(variants) * len(backbones), 4))
    width = 0.8 / len(backbones)
    for b, backbone in enumerate(backbones):
        stats = [table.get((backbone, v), {}).get(TASK_MEAN, (float("nan"), 0.0, 0)) for v in variants]
        xs = [i + (b - (len(backbones) - 1) / 2) * width for i in range(len(variants))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=backbone)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("test accuracy, mean over tasks (%)")
    ax.set_title("VTAB-mini")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], out: Path, cfg: Any) -> list[Path]:
    """``results.md`` (tables), ``cells.csv`` (one line per cell) and ``results.png``; returns the paths."""
    if not rows:
        return []
    written = []
    command = " ".join(["selfprompt", *sys.argv[1:]])
    settings = json.dumps(asdict(cfg))
    text = (
        f"# VTAB-mini bench\n\n{len(rows)} cells; command `{command}`; resolved settings `{settings}`.\n\n"
        f"{markdown(rows)}"
    )
    for name, content in (("results.md", text), ("cells.csv", _csv(rows))):
        atomic_write(out / name, lambda p, c=content: p.write_text(c))
        written.append(out / name)
    if plot(rows, out / "results.png"):
        written.append(out / "results.png")
    return written
