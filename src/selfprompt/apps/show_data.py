"""``selfprompt data show``: a few images per class of one's own image folder, as the model sees them (after
the evaluation transform), in one PNG with each row named by its class."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from selfprompt.atomic import atomic_write
from selfprompt.config import TrainConfig
from selfprompt.data.datasets import load_split
from selfprompt.data.own_folder import find_splits
from selfprompt.data.splits import eval_transform, preprocessing
from selfprompt.engine.build import create_backbone

import torch
from PIL import Image, ImageDraw

PAD = 4  # pixels between cells
LABEL_WIDTH = 120  # the column of class names
MIN_CELL = 96  # small inputs are enlarged (nearest neighbour) to at least this side


@dataclass(frozen=True)
class Grid:
    """Where the grid went, its size in pixels and what it shows."""

    path: Path
    size: tuple[int, int]
    classes: int
    per_class: int
    cell: int


def grid_size(classes: int, per_class: int, cell: int) -> tuple[int, int]:
    """``(width, height)`` of a grid of ``classes`` rows of ``per_class`` cells of side ``cell``."""
    return LABEL_WIDTH + per_class * (cell + PAD) + PAD, classes * (cell + PAD) + PAD


def _picture(image: torch.Tensor, mean, std, side: int) -> Image.Image:
    """A normalised ``(3, H, W)`` tensor back as an RGB picture, enlarged to ``side``."""
    pixels = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((side, side), Image.Resampling.NEAREST)


def show_images(
    cfg: TrainConfig,
    output: str | Path,
    *,
    per_class: int = 4,
    split: str | None = None,
    max_classes: int = 30,
) -> Grid:
    """Write a PNG of the first ``per_class`` images of each class (at most ``max_classes`` classes) of the
    image folder ``cfg.data.root``'s ``split`` (default: train), through the evaluation transform that
    ``cfg`` (its backbone and data settings) trains and predicts with."""
    if per_class < 1 or max_classes < 1:
        raise ValueError(f"per_class and max_classes must be >= 1, got {per_class} and {max_classes}.")
    found = find_splits(cfg.data.root)
    backbone = create_backbone(cfg.model)
    dataset = load_split(
        found.root, "folder", split or found.train, eval_transform(cfg.data, backbone), check_images=False
    )
    pre = preprocessing(cfg.data, backbone)
    side = pre["input_size"][-1]
    cell = side * math.ceil(MIN_CELL / side) if side < MIN_CELL else side
    names = dataset.classes[:max_classes]
    width, height = grid_size(len(names), per_class, cell)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        top = PAD + row * (cell + PAD)
        draw.text((PAD, top + cell // 2 - 6), name[:18], fill="black")
        indices = [i for i, (_, label) in enumerate(dataset.samples) if label == row][:per_class]
        for column, index in enumerate(indices):
            picture = _picture(dataset[index][0], pre["mean"], pre["std"], cell)
            canvas.paste(picture, (LABEL_WIDTH + PAD + column * (cell + PAD), top))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda temporary: canvas.save(temporary, format="PNG"))
    return Grid(output, (width, height), len(names), per_class, cell)
