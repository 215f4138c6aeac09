"""A tiny generated dataset and a tiny training config for engine and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

from selfprompt.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from selfprompt.data import write_image_folder
from selfprompt.methods import get_method

import torch
from safetensors.torch import load_file

TINY_BACKBONE = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
LIST_SPLITS = {"layout": "list", "train_split": "train", "val_split": "val", "trainval_split": "trainval"}


def make_dataset(root: Path) -> Path:
    return write_image_folder(root, num_classes=3, per_class={"train": 16, "val": 8, "test": 8}, size=32)


def tiny_config(root: Path, out: Path, method: str = "spt-deep", **overrides) -> TrainConfig:
    """3 epochs of batch 8 on 48 train images; ``overrides`` are 'section.field' -> value."""
    cfg = TrainConfig(
        model=ModelConfig(
            backbone="vit_tiny_patch16_224",
            pretrained=False,
            backbone_kwargs=dict(TINY_BACKBONE),
            method=method,
        ),
        data=DataConfig(root=str(root), **LIST_SPLITS, batch_size=8, eval_batch_size=16, num_workers=0),
        optim=OptimConfig(lr={"full": 1e-3, "bitfit": 5e-3}.get(method, 2e-2), epochs=3, warmup_epochs=1),
        output_dir=str(out),
        progress=False,
    )
    if get_method(method).has_prompts:
        cfg.prompt.num_prompts = 4
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


def cli_args(root: Path, out: Path) -> list[str]:
    """The command-line equivalent of ``tiny_config(root, out)``."""
    return [
        "--data.root", str(root),
        *[a for k, v in LIST_SPLITS.items() for a in (f"--data.{k}", v)],
        "--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.num_workers", "0",
        "--model.backbone", "vit_tiny_patch16_224", "--model.pretrained", "false",
        "--model.backbone_kwargs", json.dumps(TINY_BACKBONE),
        "--model.method", "spt-deep", "--prompt.num_prompts", "4",
        "--optim.lr", "0.02", "--optim.epochs", "3", "--optim.warmup_epochs", "1",
        "--output_dir", str(out), "--progress", "false",
    ]  # fmt: skip


def adapter(run_dir: Path, stage: str = "final", seed: int = 0) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"seed{seed}" / stage / "adapter" / "adapter.safetensors")


def metrics(run_dir: Path, stage: str = "final", seed: int = 0, timings: bool = False) -> list[dict]:
    rows = [
        json.loads(line)
        for line in (run_dir / f"seed{seed}" / stage / "metrics.jsonl").read_text().splitlines()
    ]
    if not timings:
        rows = [{k: v for k, v in r.items() if k not in ("epoch_time", "data_time")} for r in rows]
    return rows
