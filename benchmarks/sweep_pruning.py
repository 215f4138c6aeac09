"""``selfprompt sweep`` with and without Optuna's pruner on one VTAB-mini task: wall time, trials pruned and
the setting chosen.

The package's VTAB-mini recipe of the method on the MAE zoo backbone (``vit_mini_patch4_32.mae_fmnist``),
one seed, the tune stage only (train800 -> val200; ``--final false``: nothing is tested), the learning-rate
grid of the method's default search (``Search`` in its module) or the ``--lrs`` given, once with ``--pruner
none`` and once with each pruner asked for, in one process, each in a fresh output folder. The grid's order is
Optuna's seeded one, so both sweeps train the settings in the same order. Prints one line per sweep: its wall
time and the CPU time of this process and its finished children (less sensitive to other load on the
machine), each as a ratio to the unpruned sweep's, and writes them to ``--output`` as JSON.

    python benchmarks/sweep_pruning.py [--task clevr_distance] [--method spt-deep] [--epochs 10]
        [--lrs 0.1 0.05 ...] [--pruners median hyperband] [--work /tmp/sweep-pruning]
        [--output sweep_pruning.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import selfprompt  # noqa: F401  (before timm, see README)
from selfprompt.apps.demo import DEMO_BACKBONE, method_config
from selfprompt.apps.sweep import SweepSettings, sweep
from selfprompt.data import vtab_mini
from selfprompt.methods import get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="clevr_distance")
    parser.add_argument("--method", default="spt-deep")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="default: the method's grid")
    parser.add_argument("--pruners", nargs="+", default=["median", "hyperband"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sweep-pruning"))
    parser.add_argument("--output", type=Path, default=Path("sweep_pruning.json"))
    args = parser.parse_args()
    data = args.work / "data"
    if not (data / args.task / vtab_mini.MANIFEST_NAME).is_file():
        vtab_mini.prepare_task(data, args.task)
    search = {"optim.lr": args.lrs or get_method(args.method).search.grid["optim.lr"]}
    rows = []
    for pruner in ["none", *args.pruners]:
        out = args.work / f"sweep-{pruner}"
        shutil.rmtree(out, ignore_errors=True)
        base = method_config(
            args.method, DEMO_BACKBONE, data / args.task, out, seeds=[0],
            optim={"epochs": args.epochs, "warmup_epochs": 1},
        )  # fmt: skip
        started, cpu = time.perf_counter(), _cpu_seconds()
        record = sweep(base, SweepSettings(search, final=False, pruner=pruner), log=lambda _: None)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        pruned = [t["params"]["optim.lr"] for t in record["trials"] if "pruned_at" in t]
        best = record["best"]
        rows.append(
            {"pruner": pruner, "seconds": seconds, "cpu_seconds": cpu, "pruned": pruned,
             "chosen": best["params"], "chosen_val_acc": best["val_acc"]}
        )  # fmt: skip
        ratio, cpu_ratio = seconds / rows[0]["seconds"], cpu / rows[0]["cpu_seconds"]
        print(
            f"pruner {pruner:9s} {seconds:7.1f} s ({ratio:.2f}x of none), CPU {cpu:7.1f} s "
            f"({cpu_ratio:.2f}x)  pruned lr {pruned}  chosen {best['params']} "
            f"val {100 * best['val_acc']:.2f}%"
        )
    args.output.write_text(json.dumps({"task": args.task, "method": args.method, "search": search,
                                       "epochs": args.epochs, "sweeps": rows}, indent=1))  # fmt: skip


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have finished (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
