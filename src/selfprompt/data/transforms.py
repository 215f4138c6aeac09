"""Image transforms from a backbone's timm data config: VTAB's resize + center crop, FGVC's crop + flip."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

AugmentType = Literal["none", "crop-flip"]
AUGMENTS: tuple[str, ...] = ("none", "crop-flip")
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def data_config(
    backbone: torch.nn.Module,
    *,
    img_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> dict[str, Any]:
    """The backbone's preprocessing (timm's pretrained config) with the given overrides applied.

    The input size follows ``patch_embed.img_size``, the size the backbone was built for (timm's
    pretrained config keeps its default when ``img_size`` was overridden at creation). Returns
    ``input_size`` ``(3, H, W)``, ``interpolation``, ``mean``, ``std`` and ``crop_pct``.
    """
    resolved = resolve_data_config({}, model=backbone)
    cfg = {key: resolved[key] for key in ("input_size", "interpolation", "mean", "std", "crop_pct")}
    patch_embed = getattr(backbone, "patch_embed", None)
    if getattr(patch_embed, "img_size", None):  # the size it was built for (timm's cfg keeps the default)
        cfg["input_size"] = (3, *patch_embed.img_size)
    if img_size is not None:
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}.")
        cfg["input_size"] = (3, img_size, img_size)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"Unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}.")
        cfg["interpolation"] = interpolation
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        cfg["crop_pct"] = crop_pct
    if mean is not None:
        cfg["mean"] = tuple(mean)
    if std is not None:
        cfg["std"] = tuple(std)
    return cfg


def build_transform(
    cfg: dict[str, Any], *, train: bool, augment: AugmentType = "none", min_scale: float = 0.08
) -> Callable:
    """PIL image -> normalised ``(3, H, W)`` tensor.

    Eval, and train with ``augment="none"`` (VTAB): timm's resize + center crop (``crop_pct``). Train with
    ``"crop-flip"`` (FGVC): RandomResizedCrop (area scale ``min_scale``-1) + horizontal flip, nothing else.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"Unknown augment {augment!r}; use one of {AUGMENTS}.")
    if train and augment == "crop-flip":
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    tuple(cfg["input_size"][-2:]),
                    scale=(min_scale, 1.0),
                    interpolation=str_to_interp_mode(cfg["interpolation"]),
                ),
                transforms.RandomHorizontalFlip(0.5),
                transforms.ToTensor(),
                transforms.Normalize(cfg["mean"], cfg["std"]),
            ]
        )
    return create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        is_training=False,
    )
