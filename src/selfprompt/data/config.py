"""Typed settings of the data a run reads: dataset, splits, loading and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Dataset, splits, loading and preprocessing.

    Attributes:
        root: Dataset root directory: a task's folder, or with ``task`` the benchmark folder holding it.
        benchmark: The registered benchmark ``task`` belongs to (``selfprompt data list`` names them).
        task: A registry task: its folder under root is used (or root itself when it holds the split lists),
            its class count sizes the head (VTAB-1k's train800 can miss classes), and a mismatch is an error.
        layout: list (VTAB-1k style "path label" files named <split>.txt under root) or folder
            (root/<split>/<class>/<image>).
        train_split: Split trained on while tuning.
        val_split: Split that selects; None carves a seeded val_fraction out of train_split.
        trainval_split: Split the final model trains on; None merges train_split and val_split.
        test_split: Split evaluated once, by the final model; None: the data has no test split (stage tune
            only).
        val_fraction: Share of train_split held out (stratified, seeded) when val_split is None.
        batch_size: Global batch size: across all processes and accumulation steps.
        eval_batch_size: Global batch size for evaluation.
        num_workers: Data-loading worker processes per training process.
        augment: none (the VTAB protocol) or crop-flip (random resized crop + flip, the FGVC protocol).
        img_size: Input size; None takes the backbone's pretrained config.
        normalization: backbone (the weights' own mean/std: timm's pretrained config, ImageNet's for MAE,
            MoCo v3 and DINO files) or imagenet (what the SPT code used for every backbone); explicit mean
            and std win over both.
        mean: Normalisation mean; None takes the backbone's pretrained config.
        std: Normalisation std; None takes the backbone's pretrained config.
        interpolation: Resize interpolation; None takes the backbone's pretrained config.
        crop_pct: Centre-crop fraction for evaluation; None takes the backbone's pretrained config.
        check_images: Open every image header before training, so a broken file stops the run at once.
    """

    root: str | None = None
    benchmark: str | None = None
    task: str | None = None
    layout: Literal["list", "folder"] = "list"
    train_split: str = "train800"
    val_split: str | None = "val200"
    trainval_split: str | None = "train800val200"
    test_split: str | None = "test"
    val_fraction: float = 0.1
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 2
    augment: Literal["none", "crop-flip"] = "none"
    img_size: int | None = None
    normalization: Literal["backbone", "imagenet"] = "backbone"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    check_images: bool = True
