"""A small generated image dataset on disk, for tests, examples and smoke runs without downloads."""

from __future__ import annotations

import colorsys
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _pattern(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class ``label``: stripes of its own colour and orientation, a random phase, and pixel noise."""
    colour = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.9))
    angle = np.pi * label / num_classes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    stripes = np.sin(2 * np.pi / 8 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    image = colour * (0.6 + 0.4 * stripes)[..., None] + rng.normal(0, 0.08, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_image_folder(
    root: str | os.PathLike,
    *,
    num_classes: int = 3,
    per_class: dict[str, int] | int = 8,
    splits: tuple[str, ...] = ("train", "val", "test"),
    size: int = 32,
    seed: int = 0,
    lists: bool = True,
) -> Path:
    """Write a learnable generated dataset as PNGs: ``root/<split>/<class_name>/<i>.png``.

    Class k is a colour and stripe orientation of its own (plus noise), which a small ViT's head learns in
    a few steps. Class names are ``class0`` .. ``class{num_classes - 1}`` (zero-padded beyond 10 classes, so
    that sorted folder names keep the label order). With ``lists``, also writes the VTAB-style list files
    ``root/<split>.txt`` (``relative/path label`` lines), ``root/trainval.txt`` (train + val) when both
    splits exist, and ``root/classes.txt``. The same arguments give byte-identical files; existing files of
    the same names are overwritten, others are left alone (write into an empty folder).

    Args:
        root: Output folder (created).
        num_classes: Number of classes.
        per_class: Images per class, for every split or per split name.
        splits: Split folders to write.
        size: Image side in pixels.
        seed: Seeds the patterns' phases and noise.
        lists: Also write the list files.
    """
    counts = per_class if isinstance(per_class, dict) else dict.fromkeys(splits, per_class)
    missing = [split for split in splits if split not in counts]
    if missing:
        raise ValueError(f"per_class has no count for splits {missing}; give one for each of {splits}.")
    if num_classes < 1 or size < 1 or any(counts[split] < 1 for split in splits):
        raise ValueError(
            f"num_classes, size and per_class counts must be positive, got {num_classes}, {size}, {counts}."
        )
    root = Path(root)
    width = len(str(num_classes - 1))
    names = [f"class{k:0{width}d}" for k in range(num_classes)]
    lines: dict[str, list[str]] = {}
    for split in splits:
        lines[split] = []
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, zlib.crc32(split.encode()), label])
            for i in range(counts[split]):
                Image.fromarray(_pattern(label, num_classes, size, rng)).save(folder / f"{i}.png")
                lines[split].append(f"{split}/{name}/{i}.png {label}")
    if lists:
        if "train" in lines and "val" in lines:
            lines["trainval"] = lines["train"] + lines["val"]
        for split, split_lines in lines.items():
            (root / f"{split}.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
        (root / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root
