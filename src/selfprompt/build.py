"""From a config to objects: the backbone, the model of a method, the splits of the protocol."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from selfprompt import backbones
from selfprompt.backbones import backbone_info
from selfprompt.config import DataConfig, ModelConfig
from selfprompt.data import (
    ImageDataset,
    build_transform,
    data_config,
    load_split,
    merge,
    registry,
    split_off,
    vtab_mini,
)
from selfprompt.model import PromptedViT, ViTClassifier, backbone_pool

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

NORMALIZATIONS = ("backbone", "imagenet")


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """The configured backbone (see :func:`selfprompt.backbones.create_backbone`)."""
    return backbones.create_backbone(
        cfg.backbone,
        cfg.checkpoint,
        pretrained=cfg.pretrained,
        **dict(cfg.backbone_kwargs, drop_path_rate=cfg.drop_path),
    )


def backbone_name(backbone: nn.Module) -> str | None:
    """The name saved with adapters: the timm name, plus the weights file when one was given."""
    return backbone_info(backbone).adapter_name


def head_input(cfg: ModelConfig, backbone: nn.Module) -> str:
    """``model.pool``, else the weights family's (``mae`` for MAE), else the backbone's own pooling."""
    return cfg.pool or backbone_info(backbone).pool or backbone_pool(backbone)


def init_method(cfg: ModelConfig) -> str | None:
    """The prompt initializer of the configured method (None for linear and full)."""
    if cfg.method in ("linear", "full"):
        if cfg.init is not None:
            raise ValueError(f"method {cfg.method!r} has no prompts; drop model.init ({cfg.init!r}).")
        return None
    if cfg.method.startswith("vpt"):
        if cfg.init not in (None, "xavier"):
            raise ValueError(
                f"{cfg.method} is VPT, initialised with xavier; for model.init={cfg.init!r} use "
                f"spt-{cfg.method.split('-')[1]}."
            )
        return "xavier"
    return cfg.init or "sample"


def build_model(cfg: ModelConfig, backbone: nn.Module, num_classes: int) -> ViTClassifier:
    common = dict(
        pool=head_input(cfg, backbone), head_init_std=cfg.head_init_std, backbone_name=backbone_name(backbone)
    )
    if cfg.method in ("linear", "full"):
        return ViTClassifier(backbone, num_classes, train_backbone=cfg.method == "full", **common)
    deep = cfg.method.endswith("deep")
    return PromptedViT(
        backbone,
        num_classes,
        num_prompts=cfg.num_prompts or (20 if deep else 100),
        deep=deep,
        deep_layers=cfg.deep_layers,
        prompt_dropout=cfg.prompt_dropout,
        **common,
    )


@dataclass
class Splits:
    """The protocol's datasets: tune trains on ``train`` and selects on ``val``; final trains on
    ``trainval`` and evaluates ``test`` once. ``init`` is ``train`` with eval transforms (for SPT)."""

    train: ImageDataset
    val: ImageDataset
    trainval: ImageDataset
    test: ImageDataset
    init_train: ImageDataset
    init_trainval: ImageDataset

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def fingerprints(self) -> dict[str, str]:
        return {name: getattr(self, name).fingerprint() for name in ("train", "val", "trainval", "test")}


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
        raise ValueError(f"data.task {cfg.task!r} needs data.benchmark: vtab-1k, fgvc or vtab-mini.")
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


def build_splits(cfg: DataConfig, backbone: nn.Module, seed: int = 0) -> Splits:
    """Load and check every split before anything is written (a bad dataset stops the run up front)."""
    root, task_classes = task_root(cfg)
    if (root / vtab_mini.MANIFEST_NAME).is_file() and json.loads(
        (root / vtab_mini.MANIFEST_NAME).read_text()
    ).get("benchmark", "vtab-mini") == "vtab-mini":
        vtab_mini.verify(root)  # a prepared task is checked against its hashes before use
    pre = preprocessing(cfg, backbone)
    train_tf = build_transform(pre, train=True, augment=cfg.augment)
    eval_tf = build_transform(pre, train=False)

    def load(split: str, transform, classes=None) -> ImageDataset:
        return load_split(root, cfg.layout, split, transform, classes=classes, check_images=cfg.check_images)

    train = load(cfg.train_split, train_tf, task_classes)
    classes = train.classes
    if cfg.val_split is None:
        train, val = split_off(train, cfg.val_fraction, seed)
        val = copy.copy(val)
        val.transform = eval_tf
        trainval = load(cfg.train_split, train_tf, classes)
    else:
        val = load(cfg.val_split, eval_tf, classes)
        if cfg.trainval_split is not None:
            trainval = load(cfg.trainval_split, train_tf, classes)
        else:
            trainval = merge(train, load(cfg.val_split, train_tf, classes))
    test = load(cfg.test_split, eval_tf, classes)

    def with_eval_transform(dataset: ImageDataset) -> ImageDataset:
        view = copy.copy(dataset)
        view.transform = eval_tf
        return view

    return Splits(train, val, trainval, test, with_eval_transform(train), with_eval_transform(trainval))
