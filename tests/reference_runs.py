"""The seeded one-epoch VTAB-mini runs whose results were recorded before the method registry existed."""

from pathlib import Path

from selfprompt.apps.bench import RECIPES

import torch

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "spt-shallow", "spt-deep")
TASK = "dsprites_location"
BACKBONE = "vit_mini_patch4_32.mae_fmnist"
SAMPLE = 1024  # elements kept of a larger tensor (every n-th), so the full fine-tune's fixture stays small


def run_args(method: str, task_dir: Path, out: Path) -> list[str]:
    """``selfprompt train`` of the method's VTAB-mini recipe for one epoch of the final stage."""
    return [
        "train", str(RECIPES / f"{method.replace('-', '_')}.yaml"),
        "--model.backbone", BACKBONE, "--model.pool", "avg",
        "--data.root", str(task_dir), "--data.num_workers", "0",
        "--optim.epochs", "1", "--optim.warmup_epochs", "1",
        "--seeds", "[0]", "--stage", "final", "--output_dir", str(out), "--progress", "false",
    ]  # fmt: skip


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor flattened, whole up to ``SAMPLE`` elements, else every n-th element (at most 2 x SAMPLE)."""
    flat = tensor.detach().flatten()
    return flat[:: max(1, flat.numel() // SAMPLE)].contiguous()
