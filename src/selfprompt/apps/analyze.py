"""``selfprompt analyze``: the tracked statistics of one or more runs over epochs, per layer, as PNGs, and a
2-D projection of the prompts over the patch tokens at the start and the end of training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.analysis.statistics import STATISTICS
from selfprompt.config import migrate
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.trained import stage_order

import torch
from safetensors.torch import load_file

TITLES = {
    "nmi_max": "NMI, max over patch tokens (mean over prompts)",
    "nmi_mean": "NMI, mean over patch tokens and prompts",
    "inertia_ratio": "patch-token inertia, prompts as centres / k-means (K = M)",
    "nearest_cosine": "cosine similarity of a patch token to its nearest prompt",
    "norms": "mean L2 norm: prompts (solid), patch tokens (dashed)",
}


@dataclass
class TrackedRun:
    """One stage's tracked statistics: rows per tracked epoch and the projection tensors by epoch."""

    label: str
    rows: list[dict[str, Any]]
    projections: dict[int, dict[str, torch.Tensor]]

    @property
    def num_layers(self) -> int:
        return sum(1 for key in self.rows[0] if key.startswith("nmi_max/"))

    def series(self, statistic: str, layer: int) -> tuple[list[int], list[float]]:
        return [r["epoch"] for r in self.rows], [r[f"{statistic}/layer{layer}"] for r in self.rows]


def tracked_stage_dir(run_dir: str | Path, seed: int | None = None, stage: str | None = None) -> TrainingDir:
    """The stage folder holding ``analysis.jsonl``: ``stage`` (default: final, else tune) of ``seed``
    (default: the run's first seed)."""
    run = RunDir(Path(run_dir))
    config = run.read_config()
    seed = config["seeds"][0] if seed is None else seed
    for name in stage_order(stage):
        folder = run.stage(seed, name)
        if folder.log_file(TrainingDir.ANALYSIS, "jsonl").is_file():
            return folder
    raise FileNotFoundError(
        f"{run_dir} has no tracked statistics for seed {seed}, stage {' or '.join(stage_order(stage))}: "
        f"train with --track.every N (e.g. 1) to record them."
    )


def load_tracked(run_dir: str | Path, seed: int | None = None, stage: str | None = None) -> TrackedRun:
    folder = tracked_stage_dir(run_dir, seed, stage)
    rows = folder.read_rows(TrainingDir.ANALYSIS)
    if not rows:
        raise ValueError(
            f"{folder.log_file(TrainingDir.ANALYSIS, 'jsonl')} is empty: the run recorded nothing yet."
        )
    config = migrate(RunDir(Path(run_dir)).read_config())
    init = config.get("prompt", {}).get("init")
    label = config["model"]["method"] + (f" ({init})" if init else "")
    projections = {epoch: load_file(path) for epoch, path in folder.projections().items()}
    return TrackedRun(label, rows, projections)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError(
            "selfprompt analyze draws with matplotlib, which is not installed: pip install matplotlib"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_grid(plt, num_layers: int, title: str, size: float = 3.0):
    cols = min(num_layers, 4 if num_layers > 6 else 3)
    rows = math.ceil(num_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * 0.8 * rows + 0.6), squeeze=False)
    for ax in axes.flat[num_layers:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes.flat


def plot_statistic(runs: list[TrackedRun], statistic: str, path: Path) -> Path:
    """One panel per layer: ``statistic`` (or ``norms``: prompt and patch-token norms) over epochs per run."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _layer_grid(plt, runs[0].num_layers, TITLES[statistic])
    for layer, ax in zip(range(runs[0].num_layers), axes, strict=False):
        for index, run in enumerate(runs):
            colour = f"C{index}"
            if statistic == "norms":
                ax.plot(*run.series("prompt_norm", layer), color=colour, marker=".", label=run.label)
                ax.plot(*run.series("patch_norm", layer), color=colour, linestyle="--")
            else:
                ax.plot(*run.series(statistic, layer), color=colour, marker=".", label=run.label)
        ax.set_title(f"block {layer} input", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of ``points`` (N, D) and their two principal directions (D, 2)."""
    mean = points.mean(dim=0)
    directions = torch.linalg.svd(points - mean, full_matrices=False).Vh[:2].T
    return mean, directions


def plot_projection(runs: list[TrackedRun], path: Path) -> Path:
    """Per run (row) and layer (column): patch tokens and prompts on the patch tokens' two principal axes,
    at the first (start) and last (end) tracked epoch; an arrow joins each prompt's start and end."""
    plt = _pyplot()
    num_layers = runs[0].num_layers
    fig, axes = plt.subplots(
        len(runs), num_layers, figsize=(max(2.2 * num_layers, 5.0), 2.3 * len(runs) + 0.6), squeeze=False
    )
    for row, run in zip(axes, runs, strict=True):
        if len(run.projections) < 2:
            raise ValueError(
                f"{run.label}: the projection needs the start and the end of training; this run saved "
                f"epochs {sorted(run.projections)} (it has not finished)."
            )
        start, end = run.projections[min(run.projections)], run.projections[max(run.projections)]
        for layer, ax in enumerate(row):
            mean, axes_2d = pca_2d(torch.cat([start["patches"][layer], end["patches"][layer]]))

            def project(x: torch.Tensor, mean=mean, axes_2d=axes_2d) -> torch.Tensor:
                return (x - mean) @ axes_2d

            for tokens, colour in ((start["patches"][layer], "0.75"), (end["patches"][layer], "0.45")):
                ax.scatter(*project(tokens).T, s=3, color=colour, linewidths=0)
            a, b = project(start["prompts"][layer]), project(end["prompts"][layer])
            for (x0, y0), (x1, y1) in zip(a.tolist(), b.tolist(), strict=True):
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "C3", "lw": 0.6})
            ax.scatter(*a.T, s=14, marker="x", color="C0", label="prompts, start")
            ax.scatter(*b.T, s=14, marker="o", color="C3", label="prompts, end")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{run.label}\nblock {layer}" if layer == 0 else f"block {layer}", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("prompts over patch tokens (grey: light start, dark end), PCA per block", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def analyze(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    seed: int | None = None,
    stage: str | None = None,
) -> list[Path]:
    """Write the PNGs of ``run_dirs`` (overlaid, e.g. VPT and SPT) into ``output`` (default: the first run's
    ``analysis`` folder); returns their paths."""
    if not run_dirs:
        raise ValueError("Pass at least one run directory.")
    runs = [load_tracked(d, seed, stage) for d in run_dirs]
    labels = [run.label for run in runs]
    for run, run_dir in zip(runs, run_dirs, strict=True):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{Path(run_dir).name}]"
    depths = {run.num_layers for run in runs}
    if len(depths) > 1:
        raise ValueError(f"The runs track different numbers of layers ({sorted(depths)}); compare like runs.")
    output = Path(output) if output is not None else Path(run_dirs[0]) / "analysis"
    output.mkdir(parents=True, exist_ok=True)
    statistics = [name for name in STATISTICS if not name.endswith("_norm")] + ["norms"]
    paths = [plot_statistic(runs, name, output / f"{name}.png") for name in statistics]
    return [*paths, plot_projection(runs, output / "projection.png")]
