"""Typed configuration of ``selfprompt pretrain``: MAE or supervised pretraining of a timm ViT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from selfprompt.config import (
    OptimConfig,
    RunOptions,
    batch_problems,
    engine_problems,
    optim_problems,
    raise_problems,
)
from selfprompt.methods.settings import in_range, positive_int


@dataclass
class MAEConfig:
    """Masked-autoencoder settings (He et al., 2022).

    Attributes:
        mask_ratio: Share of patch tokens masked per image.
        decoder_dim: Width of the light decoder.
        decoder_depth: Transformer blocks of the decoder.
        decoder_heads: Attention heads of the decoder.
        norm_pix_loss: Reconstruct per-patch normalised pixels (the paper's better target).
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


@dataclass
class PretrainDataConfig:
    """Pretraining images.

    Attributes:
        source: fashion-mnist (the IDX files of Debian's dataset-fashion-mnist) or folder
            (root/<split>/<class>/<image>, as `selfprompt train` reads with layout folder).
        root: fashion-mnist: the folder of its .gz files (None: /usr/share/datasets/fashion-mnist);
            folder: the dataset root.
        train_split: folder source: the split pretrained on.
        eval_split: folder source: a split evaluated by supervised pretraining (None: none). Fashion-MNIST
            evaluates its 10k test images.
        max_images: Pretrain on the first this many images only (quick checks); None uses all.
        batch_size: Global batch size.
        eval_batch_size: Batch size of evaluation.
        num_workers: Data-loading worker processes per training process.
        min_scale: Lower bound of RandomResizedCrop's area scale (MAE: 0.2).
    """

    source: Literal["fashion-mnist", "folder"] = "fashion-mnist"
    root: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    max_images: int | None = None
    batch_size: int = 256
    eval_batch_size: int = 512
    num_workers: int = 4
    min_scale: float = 0.2


def _mae_optim() -> OptimConfig:
    return OptimConfig(
        lr=1.5e-3, weight_decay=0.05, head_weight_decay=0.05, betas=(0.9, 0.95), epochs=100, warmup_epochs=10
    )


@dataclass
class PretrainConfig(RunOptions):
    """A pretraining run: objective, backbone, data, optimizer, where it writes.

    Attributes:
        objective: mae (masked autoencoder, normalised-pixel loss) or supervised (cross-entropy on labels).
        backbone: timm architecture name, created with random weights (e.g. vit_mini_patch4_32).
        backbone_kwargs: Extra keyword arguments for timm.create_model.
        data: Pretraining images.
        optim: AdamW and its warmup + cosine schedule; biases, norms and position/class/mask tokens are
            not decayed.
        mae: Masked-autoencoder settings (objective mae).
        label_smoothing: Label smoothing of the supervised loss.
        drop_path: Stochastic depth of the encoder.
        output_dir: Run directory (config, metrics, checkpoint, encoder weights, summary).
        seed: Seed of the weights, the data order, the masks and the augmentation.
        eval_every: Supervised: evaluate every this many epochs (and after the last).
    """

    objective: Literal["mae", "supervised"] = "mae"
    backbone: str = "vit_mini_patch4_32"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=_mae_optim)
    mae: MAEConfig = field(default_factory=MAEConfig)
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    output_dir: str = "runs/pretrain"
    seed: int = 0
    eval_every: int = 10


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Refuse values that cannot run, before anything is created or written (ConfigError names them)."""
    problems = batch_problems(cfg.data) + optim_problems(cfg.optim)
    if cfg.data.max_images is not None and not positive_int(cfg.data.max_images):
        problems.append(f"data.max_images must be an integer >= 1 or null, got {cfg.data.max_images!r}")
    if not in_range(cfg.data.min_scale, 0, 1, low_open=True, high_open=False):
        problems.append(f"data.min_scale must be in (0, 1], got {cfg.data.min_scale!r}")
    if not in_range(cfg.mae.mask_ratio, 0, 1, low_open=True):
        problems.append(f"mae.mask_ratio must be in (0, 1), got {cfg.mae.mask_ratio!r}")
    for name in ("drop_path", "label_smoothing"):
        if not in_range(getattr(cfg, name), 0, 1):
            problems.append(f"{name} must be in [0, 1), got {getattr(cfg, name)!r}")
    if not positive_int(cfg.eval_every):
        problems.append(f"eval_every must be an integer >= 1, got {cfg.eval_every!r}")
    problems += engine_problems(cfg, augment="crop-flip", tracking=False)
    for name, value in (("checkpointing", cfg.checkpointing), ("backbone_dtype", cfg.backbone_dtype)):
        if value not in (False, "fp32"):  # both act on a frozen backbone's classifier
            problems.append(f"{name} applies to prompt tuning's frozen backbone, not pretraining: unset it")
    raise_problems(problems, cfg)
