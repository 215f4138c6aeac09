"""``selfprompt demo``: linear probing, VPT-deep and SPT-deep on one VTAB-mini task with the MAE zoo backbone,
offline in a few CPU minutes; prints a table and one sentence on what it shows, and writes the validation
curves beside the prompts' NMI with the patch tokens (PNG) and the results (JSON).

Each method trains on train800 with its VTAB-mini recipe, is validated on val200 every epoch, and its last
model is evaluated on test once (nothing is selected on test; the bench's protocol retrains on
train800val200 instead). The prompt runs track their prompt/patch-token statistics every epoch.

The task, by a rule fixed before the demo was run on it: the VTAB-mini task with the largest gap between the
linear probe and the better prompt method on the MAE backbone in ``docs/results.md``'s main grid (seed 0):
clevr_distance (linear 40.75%, vpt-deep 75.60%, spt-deep 68.45%)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from selfprompt.apps.analyze import load_tracked
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
DEMO_TASK = "clevr_distance"  # the rule: see the module's docstring
DEMO_EPOCHS = 6  # the recipes train 10; 8 did not fit 5 minutes from a fresh clone (2 cores, with install)
NOISE_POINTS = 2.0  # one seed: differences below this are not findings (docs/results.md, noise floor)


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
    task: str = DEMO_TASK,
    epochs: int = DEMO_EPOCHS,
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
        optim = {"epochs": epochs, "warmup_epochs": 1}
        track = {"track": {"every": 1}} if method != "linear" else {}
        cfg = method_config(
            method, DEMO_BACKBONE, data_root / task, run_dir, seeds=[seed], device=device, optim=optim,
            stage="tune", resume=RunDir(run_dir).is_run(), **track,
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
        if track:
            results["methods"][method]["nmi_curve"] = mean_nmi(run_dir, seed)
    results["summary"] = summary_sentence(results)
    write_json(out / "demo.json", results)
    log("")
    log(table(results))
    plotted = plot_curves(results, out / "demo.png")
    log("")
    log(f"Results: {out / 'demo.json'}" + (f", curves and NMI: {out / 'demo.png'}" if plotted else ""))
    log(f"Output folder: {out.resolve()}")
    log("")
    log(results["summary"])
    return results


def mean_nmi(run_dir: Path, seed: int) -> list[float]:
    """Per tracked epoch (0 = initialisation), the prompts' NMI with the patch tokens (max over patch tokens,
    mean over prompts), averaged over the prompted layers."""
    tracked = load_tracked(run_dir, seed, "tune")
    layers = range(tracked.num_layers)
    return [sum(r[f"nmi_max/layer{i}"] for i in layers) / tracked.num_layers for r in tracked.rows]


def summary_sentence(results: dict[str, Any]) -> str:
    """One honest sentence on what the table and the plot show (test accuracy, one seed)."""
    m = {name: r["test_acc"] * 100 for name, r in results["methods"].items()}
    best = max(("vpt-deep", "spt-deep"), key=lambda name: m[name])
    gap, d = m[best] - m["linear"], m["spt-deep"] - m["vpt-deep"]
    nmi = {name: results["methods"][name]["nmi_curve"][0] for name in ("vpt-deep", "spt-deep")}
    verdict = "within" if abs(d) < NOISE_POINTS else "beyond"
    start = "more" if nmi["spt-deep"] > nmi["vpt-deep"] else "less"
    return (
        f"On {results['task']}, {best} {'beats' if gap > 0 else 'does not beat'} the linear probe by "
        f"{abs(gap):.1f} test points; SPT's prototype initialisation ends {abs(d):.1f} points "
        f"{'ahead of' if d > 0 else 'behind'} VPT's random one ({verdict} the {NOISE_POINTS:.0f}-point "
        f"noise of one seed); its prompts start with {start} information about the patch tokens (NMI "
        f"{nmi['spt-deep']:.2f} vs {nmi['vpt-deep']:.2f} at epoch 0)."
    )


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
    """Validation accuracy per epoch of each method, and beside it the prompt methods' mean NMI with the
    patch tokens per epoch; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, nmi_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (method, r) in enumerate(results["methods"].items()):
        if "nmi_curve" in r:
            nmi_ax.plot(
                range(len(r["nmi_curve"])), r["nmi_curve"], marker="o", color=f"C{index}", label=method
            )
    nmi_ax.set_xlabel("epoch (0: initialisation)")
    nmi_ax.set_ylabel("NMI, prompts vs patch tokens")
    nmi_ax.set_title("prompts' information about the patch tokens\n(mean over layers, selfprompt analyze)")
    nmi_ax.grid(alpha=0.3)
    nmi_ax.legend()
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
