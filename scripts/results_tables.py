"""The tables of docs/results.md's sections on every method (MAE and supervised backbones), SPT
initialisation for the other prompt methods, Prompt Condensation and the per-method searches, from the cells
in docs/bench/*.csv (each a copy of a bench output folder's cells.csv, written by scripts/bench_methods.sh,
scripts/bench_grids.sh and scripts/bench_prompt_successors.sh).

    python scripts/results_tables.py [--bench docs/bench]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from selfprompt.apps.stats import paired_difference

MAE = "vit_mini_patch4_32.mae_fmnist"
SUP = "vit_mini_patch4_32.sup_fmnist"
TASKS = ["mnist", "dsprites_location", "clevr_distance"]
SCIENCE_TASKS = ["dsprites_location", "clevr_distance"]
METHODS = ["linear", "vpt-deep", "spt-deep", "bitfit", "lora", "adaptformer", "ssf", "gapt", "e2vpt", "vfpt"]
METHODS += ["cvpt", "cvpt (lr 5e-2)", "pc[keep=0.5]", "pc[keep=0.3]", "pc[keep=0.1]"]
SPT_PAIRS = [("vpt-deep", "spt-deep"), *[(m, f"{m}[kmeans]") for m in ("gapt", "e2vpt", "vfpt", "cvpt")]]
SPT_PAIRS += [("cvpt (lr 5e-2)", "cvpt (lr 5e-2)[kmeans]")]
CVPT_FAST = {"cvpt[xavier]": "cvpt (lr 5e-2)", "cvpt[kmeans]": "cvpt (lr 5e-2)[kmeans]"}
SUCCESSORS = ["vpt-deep", "spt-deep", "spt-deep[vipamin]", "apt", "ipt", "bpt"]
REFERENCES = ("vpt-deep", "spt-deep")  # what each of the others is paired against
SUCCESSOR_FILES = ("successors", "successors_vipamin", "successors_sup")
PC_ROWS = [(1.0, "vpt-deep[M=10]"), (0.5, "vpt-deep[M=5]"), (0.3, "vpt-deep[M=3]"), (0.1, "vpt-deep[M=1]")]


def cells(path: Path, tasks: list[str] = TASKS, backbone: str = MAE) -> list[dict[str, Any]]:
    """The cells of ``backbone`` and ``tasks`` in one cells.csv, with numbers as numbers."""
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["backbone"] == backbone and r["task"] in tasks]
    for r in rows:
        r["test_acc"], r["seed"] = float(r["test_acc"]), int(r["seed"])
        r["trainable_parameters"] = int(r["trainable_parameters"])
    return rows


def cvpt_fast(bench: Path) -> list[dict[str, Any]]:
    """CVPT at vpt_deep.yaml's rates (bench --overrides), named apart from the recipe's cvpt cells."""
    return [dict(r, variant=CVPT_FAST[r["variant"]]) for r in cells(bench / "cvpt_lr_cpu_cells.csv")]


def merged(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells of all groups, one per (variant, task, seed): the first group's wins (a cell run twice on
    this CPU gave the same accuracy)."""
    out: dict[tuple, dict[str, Any]] = {}
    for rows in groups:
        for r in rows:
            out.setdefault((r["variant"], r["task"], r["seed"]), r)
    return list(out.values())


def accuracy(rows: list[dict[str, Any]], variant: str, task: str) -> str:
    values = [100 * r["test_acc"] for r in rows if r["variant"] == variant and r["task"] == task]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def mean_over_tasks(rows: list[dict[str, Any]], variant: str, tasks: list[str]) -> str:
    values = [100 * r["test_acc"] for r in rows if r["variant"] == variant]
    if {r["task"] for r in rows if r["variant"] == variant} != set(tasks):
        return "-"
    return f"{statistics.mean(values):.2f}"


def mae_methods(bench: Path) -> list[dict[str, Any]]:
    """Every method on the MAE backbone, seed 0; spt-deep's seed-0 cells from the two-seed CPU grid."""
    spt = [r for r in cells(bench / "cpu_deep_cells.csv") if r["variant"] == "spt-deep" and r["seed"] == 0]
    return merged(cells(bench / "methods_cpu_cells.csv"), spt, cvpt_fast(bench))


def methods_table(bench: Path, rows: list[dict[str, Any]] | None = None) -> str:
    """Every method, seed 0 (the MAE cells unless ``rows`` are given), and with other rows the MAE mean."""
    mae = mae_methods(bench)
    other = rows is not None
    rows = rows if other else mae
    header = f"| method | trainable (mean over tasks) | {' | '.join(TASKS)} | mean |"
    lines = [header + (" MAE mean |" if other else ""), "|---|---:|" + "---:|" * (len(TASKS) + 1 + other)]
    for variant in METHODS:
        params = [r["trainable_parameters"] for r in rows if r["variant"] == variant]
        if not params:
            continue
        accs = " | ".join(accuracy(rows, variant, t) for t in TASKS)
        mean = mean_over_tasks(rows, variant, TASKS)
        beside = f" {mean_over_tasks(mae, variant, TASKS)} |" if other else ""
        lines.append(f"| {variant} | {round(statistics.mean(params)):,} | {accs} | {mean} |{beside}")
    return "\n".join(lines)


def sup_methods_table(bench: Path) -> str:
    """Every method but pc on the supervised backbone, seed 0, beside its MAE mean."""
    return methods_table(bench, cells(bench / "methods_sup_cpu_cells.csv", backbone=SUP))


def spt_init_table(bench: Path) -> str:
    """Each prompt method with its default (xavier) and SPT's kmeans initialisation, paired over cells."""
    rows = merged(
        cells(bench / "methods_cpu_cells.csv"),
        cells(bench / "spt_init_cpu_cells.csv"),
        cells(bench / "cpu_deep_cells.csv"),  # vpt-deep / spt-deep (kmeans), seeds 0 and 1
        cvpt_fast(bench),
    )
    lines = [
        f"| variant | init | {' | '.join(TASKS)} | SPT - default: mean [95% interval], wins/losses (cells) |",
        "|---|---|" + "---:|" * len(TASKS) + "---|",
    ]
    for default, spt in SPT_PAIRS:
        if not any(r["variant"] == spt for r in rows):
            continue
        d = paired_difference(rows, spt, default)
        for variant, init in ((default, "xavier"), (spt, "kmeans")):
            accs = " | ".join(accuracy(rows, variant, t) for t in TASKS)
            interval = f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}], {d.wins}/{d.losses} ({d.pairs})"
            verdict = interval if init == "kmeans" else ""
            lines.append(f"| {variant} | {init} | {accs} | {verdict} |")
    return "\n".join(lines)


def pc_table(bench: Path) -> str:
    """PC's kept share against VPT-deep trained from scratch with as many prompts in all (6 blocks)."""
    short = {"vpt-deep[M=1]", "vpt-deep[M=5]"}
    lengths = [r for r in cells(bench / "length_cells.csv") if r["variant"] in short]
    rows = merged(cells(bench / "methods_cpu_cells.csv"), cells(bench / "vpt_m3_cpu_cells.csv"), lengths)
    rows += [dict(r, variant="vpt-deep[M=10]") for r in rows if r["variant"] == "vpt-deep"]
    lines = [
        "| prompts (of 60) | " + " | ".join(f"{t}: VPT / PC" for t in TASKS) + " | mean: VPT / PC |",
        "|---:|" + "---:|" * (len(TASKS) + 1),
    ]
    for keep, vpt in PC_ROWS:
        pc = "vpt-deep[M=10]" if keep == 1.0 else f"pc[keep={keep:g}]"
        pairs = " | ".join(f"{accuracy(rows, vpt, t)} / {accuracy(rows, pc, t)}" for t in TASKS)
        means = f"{mean_over_tasks(rows, vpt, TASKS)} / {mean_over_tasks(rows, pc, TASKS)}"
        lines.append(f"| {round(60 * keep)} | {pairs} | {means} |")
    return "\n".join(lines)


def chosen_lr(row: dict[str, Any]) -> str:
    """The rate a searched cell trained with, from its ``chosen`` column (``{'optim.lr': 0.05}``)."""
    return row["chosen"].split(": ")[-1].rstrip("}")


def science_table(bench: Path) -> str:
    """Each method with its own lr search on val: mean ± std over seeds, chosen rates, paired intervals."""
    rows = cells(bench / "science_mae_cells.csv", SCIENCE_TASKS)
    if not rows:
        return "(no cells yet)"
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        f"| method | {' | '.join(SCIENCE_TASKS)} | chosen lr (per cell) | seeds |",
        "|---|" + "---:|" * len(SCIENCE_TASKS) + "---|---|",
    ]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        chosen = ", ".join(sorted({chosen_lr(r) for r in mine}))
        accs = " | ".join(accuracy(rows, variant, t) for t in SCIENCE_TASKS)
        lines.append(f"| {variant} | {accs} | {chosen} | {sorted({r['seed'] for r in mine})} |")
    lines.append("")
    for a, b in (("spt-deep", "vpt-deep"), ("vpt-deep", "linear"), ("spt-deep", "linear")):
        if a in variants and b in variants:
            lines.append(f"- {paired_difference(rows, a, b).describe()}")
    return "\n".join(lines)


def successors_table(bench: Path) -> str:
    """APT, IPT, BPT and VIPAMIN beside vpt-deep and spt-deep, each at its own searched rate, per backbone:
    mean ± std over seeds, the rates seed 0's search chose, and paired intervals against vpt-deep and spt-deep
    (per backbone, then over both)."""
    parts, both = [], []
    for backbone in (MAE, SUP):
        rows = [r for name in SUCCESSOR_FILES for r in cells(bench / f"{name}_cells.csv", backbone=backbone)]
        both += rows
        lines = [
            f"#### {backbone}\n",
            f"| method | trainable (mean over tasks) | {' | '.join(TASKS)} | mean "
            f"| chosen lr ({', '.join(TASKS)}) | seeds |",
            "|---|---:|" + "---:|" * (len(TASKS) + 1) + "---|---|",
        ]
        for variant in SUCCESSORS:
            mine = [r for r in rows if r["variant"] == variant]
            if not mine:
                continue
            params = round(statistics.mean(r["trainable_parameters"] for r in mine))
            accs = " | ".join(accuracy(rows, variant, t) for t in TASKS)
            lrs = ", ".join(next((chosen_lr(r) for r in mine if r["task"] == t), "-") for t in TASKS)
            seeds = sorted({r["seed"] for r in mine})
            mean = mean_over_tasks(rows, variant, TASKS)
            lines.append(f"| {variant} | {params:,} | {accs} | {mean} | {lrs} | {seeds} |")
        parts.append("\n".join([*lines, "", *against_references(rows)]))
    parts.append("\n".join(["#### Both backbones\n", *against_references(both)]))
    return "\n\n".join(parts)


def against_references(rows: list[dict[str, Any]]) -> list[str]:
    """Each method's paired difference against vpt-deep, then against spt-deep, over the cells both ran."""
    variants = {r["variant"] for r in rows}
    others = [a for a in SUCCESSORS if a not in REFERENCES]
    pairs = [REFERENCES[::-1], *((a, b) for b in REFERENCES for a in others)]
    return [f"- {paired_difference(rows, a, b).describe()}" for a, b in pairs if {a, b} <= variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    for title, render in (
        ("Every method (seed 0)", methods_table),
        ("Every method on the supervised backbone (seed 0)", sup_methods_table),
        ("SPT initialisation for every prompt method", spt_init_table),
        ("Prompt Condensation against VPT from scratch", pc_table),
        ("Each method's own search (val), over seeds", science_table),
        ("APT, IPT, BPT and VIPAMIN against VPT and SPT", successors_table),
    ):
        print(f"### {title}\n\n{render(args.bench)}\n")


if __name__ == "__main__":
    main()
