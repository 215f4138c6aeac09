"""The protocol's splits of a configured dataset, loaded, checked and transformed before anything is
written."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfprompt.data import registry
from selfprompt.data.check import verify_prepared
from selfprompt.data.config import DataConfig
from selfprompt.data.datasets import ImageDataset, load_split, merge, split_off
from selfprompt.data.manifest import MANIFEST_NAME
from selfprompt.data.transforms import build_transform, data_config

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

NORMALIZATIONS = ("backbone", "imagenet")


@dataclass
class Splits:
    """The protocol's datasets: tune trains on ``train`` and selects on ``val``; final trains on
    ``trainval`` and evaluates ``test`` once (None: the data has no test split, so only ``tune`` runs).
    ``init`` is ``train`` with eval transforms (for SPT)."""

    train: ImageDataset
    val: ImageDataset
    trainval: ImageDataset
    test: ImageDataset | None
    init_train: ImageDataset
    init_trainval: ImageDataset

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def fingerprints(self) -> dict[str, str]:
        return {
            name: getattr(self, name).fingerprint()
            for name in ("train", "val", "trainval", "test")
            if getattr(self, name) is not None
        }


def eval_transform(cfg: DataConfig, backbone: nn.Module):
    return build_transform(preprocessing(cfg, backbone), train=False)


def preprocessing(cfg: DataConfig, backbone: nn.Module) -> dict:
    """Input size, interpolation, mean, std and crop_pct: the backbone's pretrained config, with
    ``data.normalization: imagenet`` (the SPT code's choice for every backbone) and explicit values
    winning."""
    if cfg.normalization not in NORMALIZATIONS:
        raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {cfg.normalization!r}.")
    imagenet = cfg.normalization == "imagenet"
    return data_config(
        backbone,
        img_size=cfg.img_size,
        mean=cfg.mean if cfg.mean is not None or not imagenet else IMAGENET_DEFAULT_MEAN,
        std=cfg.std if cfg.std is not None or not imagenet else IMAGENET_DEFAULT_STD,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
    )


def task_root(cfg: DataConfig) -> tuple[Path, list[str] | None]:
    """The folder holding the splits and, for a registry task without ``classes.txt``, its class names."""
    if cfg.root is None:
        raise ValueError("data.root is not set: pass --data.root DIR (or set it in the recipe).")
    root = Path(cfg.root).expanduser()
    if cfg.task is None:
        return root, None
    if cfg.benchmark is None:
        raise ValueError(f"data.task {cfg.task!r} needs data.benchmark: {registry.spelled()}.")
    info = registry.task(cfg.benchmark, cfg.task)
    if (root / info.folder).is_dir():
        root = root / info.folder
    elif not (root / f"{cfg.test_split}.txt").is_file() and cfg.layout == "list":
        raise FileNotFoundError(
            f"{cfg.benchmark} task {cfg.task}: neither {root / info.folder} nor {root} holds its lists; "
            f"pass the folder that holds {info.folder}/ (prepare it first: selfprompt data prepare "
            f"{cfg.benchmark} ...; check it: selfprompt data check {root})."
        )
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        named = [
            line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if len(named) != info.num_classes:
            raise ValueError(
                f"{classes_file} names {len(named)} classes but {cfg.benchmark} {cfg.task} has "
                f"{info.num_classes}; fix the file or the task name."
            )
        return root, named
    return root, [str(k) for k in range(info.num_classes)]


def build_splits(
    cfg: DataConfig, backbone: nn.Module, seed: int = 0, log: Callable[[str], None] | None = None
) -> Splits:
    """Load and check every split before anything is written (a bad dataset stops the run up front).

    With ``data.val_split`` null, a seeded, stratified ``data.val_fraction`` of the training split is carved
    out as the validation split, and ``log`` gets one line saying so."""
    root, task_classes = task_root(cfg)
    manifest = json.loads((root / MANIFEST_NAME).read_text()) if (root / MANIFEST_NAME).is_file() else {}
    prepared = registry.of_manifest(manifest)
    if prepared is not None and prepared.check_before_training:
        verify_prepared(root)  # a prepared task is checked against its hashes before use
    pre = preprocessing(cfg, backbone)
    train_tf = build_transform(pre, train=True, augment=cfg.augment)
    eval_tf = build_transform(pre, train=False)

    def load(split: str, transform, classes=None, option: str = "") -> ImageDataset:
        return load_split(
            root,
            cfg.layout,
            split,
            transform,
            classes=classes,
            check_images=cfg.check_images,
            option=f"data.{option}_split",
        )

    train = load(cfg.train_split, train_tf, task_classes, "train")
    classes = train.classes
    if cfg.val_split is None:
        whole = len(train)
        train, val = split_off(train, cfg.val_fraction, seed)
        val = copy.copy(val)
        val.transform = eval_tf
        trainval = load(cfg.train_split, train_tf, classes, "train")
        if log is not None:
            log(
                f"validation split: carved {len(val)} of the {whole} images of {cfg.train_split} (seeded "
                f"with {seed}, stratified by class; share --data.val_fraction {cfg.val_fraction}); "
                f"--data.val_split NAME uses a split of its own instead"
            )
    else:
        val = load(cfg.val_split, eval_tf, classes, "val")
        if cfg.trainval_split is not None:
            trainval = load(cfg.trainval_split, train_tf, classes, "trainval")
        else:
            trainval = merge(train, load(cfg.val_split, train_tf, classes, "val"))
    test = None if cfg.test_split is None else load(cfg.test_split, eval_tf, classes, "test")

    def with_eval_transform(dataset: ImageDataset) -> ImageDataset:
        view = copy.copy(dataset)
        view.transform = eval_tf
        return view

    return Splits(train, val, trainval, test, with_eval_transform(train), with_eval_transform(trainval))
