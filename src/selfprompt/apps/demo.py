"""``selfprompt demo``: linear probing, VPT-deep and SPT-deep on one VTAB-mini task with the MAE zoo backbone,
offline in a few CPU minutes; prints a table and writes validation curves (PNG) and results (JSON).

Each method trains on train800 with its VTAB-mini recipe, is validated on val200 every epoch, and its last
model is evaluated on test once (nothing is selected on test; the bench's protocol retrains on
train800val200 instead)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from selfprompt.apps.bench import RECIPES, zoo_pool
from selfprompt.apps.predict import evaluate_run
from selfprompt.atomic import write_json
from selfprompt.config import TrainConfig
from selfprompt.data import vtab_mini
from selfprompt.engine.run import run
from selfprompt.engine.rundir import RunDir

import yaml

DEMO_METHODS = ("linear", "vpt-deep", "spt-deep")
DEMO_BACKBONE = "vit_mini_patch4_32.mae_fmnist"


def method_config(
    method: str, backbone: str, task_dir: Path, output_dir: Path, **overrides: Any
) -> TrainConfig:
    """The package's VTAB-mini recipe of ``method`` on ``backbone`` and ``task_dir``."""
    recipe = yaml.safe_load((RECIPES / f"{method.replace('-', '_')}.yaml").read_text())
    recipe["model"] |= {"backbone": backbone, "pool": zoo_pool(backbone)}
    recipe["data"]["root"] = str(task_dir)
    recipe["optim"] |= overrides.pop("optim", {})
    return TrainConfig.from_dict(recipe | {"output_dir": str(output_dir), "progress": False, **overrides})


def demo(
    output_dir: str | Path | None = None,
    task: str = "clevr_count",
    epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    log=print,
) -> dict[str, Any]:
    out = Path(output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if (out / "demo.json").is_file():
        raise FileExistsError(f"{out} already holds a demo; pass another --output_dir.")
    data_root = out / "data"
    if not (data_root / task / vtab_mini.MANIFEST_NAME).is_file():
        log(f"Preparing VTAB-mini task {task} in {data_root} ...")
        vtab_mini.prepare_task(data_root, task)
    results: dict[str, Any] = {"task": task, "backbone": DEMO_BACKBONE, "seed": seed, "methods": {}}
    for method in DEMO_METHODS:
        run_dir = out / method
        optim = {"epochs": epochs} if epochs is not None else {}
        cfg = method_config(
            method, DEMO_BACKBONE, data_root / task, run_dir, seeds=[seed], device=device, optim=optim,
            stage="tune", resume=RunDir(run_dir).is_run(),
        )  # fmt: skip
        log(f"Training {method}: {cfg.optim.epochs} epochs on train800, validating on val200 ...")
        started = time.perf_counter()
        summary = run(cfg, log=lambda _: None)
        test = evaluate_run(run_dir, "test", seed, "tune", device)  # the trained model, on test once
        curve = RunDir(run_dir).stage(seed, "tune").read_rows()
        results["methods"][method] = {
            "val_acc": curve[-1]["val_acc"],
            "test_acc": test["acc"],
            "trainable_parameters": summary["trainable_parameters"],
            "trainable_share": summary["trainable_share"],
            "seconds": time.perf_counter() - started,
            "val_curve": [r["val_acc"] for r in curve],
            "run_dir": str(run_dir),
        }
    write_json(out / "demo.json", results)
    log("")
    log(table(results))
    plotted = plot_curves(results, out / "demo.png")
    log("")
    log(f"Results: {out / 'demo.json'}" + (f", validation curves: {out / 'demo.png'}" if plotted else ""))
    log(f"Output folder: {out.resolve()}")
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"VTAB-mini {results['task']}, backbone {results['backbone']}, seed {results['seed']}",
        f"{'method':10s} {'val acc':>8s} {'test acc':>9s} {'trainable params':>22s} {'time':>7s}",
    ]
    for method, r in results["methods"].items():
        params = f"{r['trainable_parameters']:,} ({100 * r['trainable_share']:.2f}%)"
        lines.append(
            f"{method:10s} {100 * r['val_acc']:7.1f}% {100 * r['test_acc']:8.1f}% {params:>22s} "
            f"{r['seconds']:6.0f}s"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: Path) -> bool:
    """Validation accuracy per epoch of each method; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results["methods"].items():
        epochs = range(1, len(r["val_curve"]) + 1)
        ax.plot(
            epochs,
            [100 * a for a in r["val_curve"]],
            marker="o",
            label=f"{method} (test {100 * r['test_acc']:.1f}%)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"VTAB-mini {results['task']}, {results['backbone']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
