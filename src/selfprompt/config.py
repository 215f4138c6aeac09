"""Typed run configuration: what a recipe (YAML) holds and the command line overrides field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["linear", "full", "vpt-shallow", "vpt-deep", "spt-shallow", "spt-deep"]
METHODS: tuple[str, ...] = ("linear", "full", "vpt-shallow", "vpt-deep", "spt-shallow", "spt-deep")


@dataclass
class ModelConfig:
    """Backbone and method.

    Attributes:
        backbone: timm model name with its pretrained tag, e.g. vit_base_patch16_224.mae; with a checkpoint
            it names the architecture, and null infers it from the checkpoint (standard ViT widths).
        checkpoint: Backbone weights file in any supported layout, recognised from its keys: timm .pth or
            .safetensors, MAE pretraining/fine-tuning, MoCo v3 pretraining/linear-probe, DINO, JAX .npz.
            None uses timm's own pretrained weights (cache, zoo or hub) when pretrained is true.
        pretrained: Load timm's pretrained weights for backbone (a checkpoint is always loaded).
        backbone_kwargs: Extra keyword arguments for timm.create_model (e.g. img_size, patch_size, depth).
        method: linear, full, vpt-shallow, vpt-deep, spt-shallow or spt-deep.
        num_prompts: Prompt tokens per layer (M); None is 20 for deep and 100 for shallow (official README).
        deep_layers: Deep prompts on the first k blocks only; None prompts all blocks.
        pool: token, avg or mae (the official SPT MAE head); None: mae for MAE weights, else the
            backbone's own pooling (the class token for supervised, MoCo v3 and DINO ViTs).
        prompt_dropout: Dropout on prompt tokens while training (VPT: 0.1).
        head_init_std: Std of the head's truncated-normal init (SPT: 0.02; 0.01 for MoCo v3).
        drop_path: Backbone stochastic depth; acts only when the backbone trains (full).
        init: Prompt initializer; None is xavier for vpt-* and sample for spt-* (the official default).
        init_fraction: Share of training images that SPT prototypes are built from; None uses all.
        init_max_images: Cap on the number of images SPT prototypes are built from.
        prompts_file: Start from prompts saved by `selfprompt init-prompts` instead of initialising.
    """

    backbone: str | None = "vit_base_patch16_224.mae"
    checkpoint: str | None = None
    pretrained: bool = True
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method: Method = "spt-deep"
    num_prompts: int | None = None
    deep_layers: int | None = None
    pool: Literal["token", "avg", "mae"] | None = None
    prompt_dropout: float = 0.0
    head_init_std: float = 0.02
    drop_path: float = 0.0
    init: str | None = None
    init_fraction: float | None = None
    init_max_images: int | None = None
    prompts_file: str | None = None


@dataclass
class DataConfig:
    """Dataset, splits, loading and preprocessing.

    Attributes:
        root: Dataset root directory: a task's folder, or with ``task`` the benchmark folder holding it.
        benchmark: vtab-1k, fgvc or vtab-mini: the registry ``task`` belongs to (``selfprompt data list``).
        task: A registry task: its folder under root is used (or root itself when it holds the split lists),
            its class count sizes the head (VTAB-1k's train800 can miss classes), and a mismatch is an error.
        layout: list (VTAB-1k style "path label" files named <split>.txt under root) or folder
            (root/<split>/<class>/<image>).
        train_split: Split trained on while tuning.
        val_split: Split that selects; None carves a seeded val_fraction out of train_split.
        trainval_split: Split the final model trains on; None merges train_split and val_split.
        test_split: Split evaluated once, by the final model.
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
    benchmark: Literal["vtab-1k", "fgvc", "vtab-mini"] | None = None
    task: str | None = None
    layout: Literal["list", "folder"] = "list"
    train_split: str = "train800"
    val_split: str | None = "val200"
    trainval_split: str | None = "train800val200"
    test_split: str = "test"
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


@dataclass
class OptimConfig:
    """AdamW with three parameter groups and a per-iteration warmup + cosine schedule.

    Attributes:
        lr: Peak learning rate (no batch-size scaling, as in the official code).
        weight_decay: Weight decay of prompts (and of backbone weights when they train).
        head_weight_decay: Weight decay of the head's weight (SPT's wd_head).
        betas: AdamW betas.
        epochs: Training epochs.
        warmup_epochs: Linear warmup from 0, in epochs (set per iteration).
        min_lr: Floor of the cosine decay.
        grad_clip: Clip the gradient norm to this value; None disables clipping.
        accumulate: Micro-batches per optimizer step (the global batch stays data.batch_size).
        ema_decay: Keep an exponential moving average of the trained parameters with this decay and evaluate
            it (reported beside the raw model); None disables EMA.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-2
    head_weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    warmup_epochs: int = 10
    min_lr: float = 1e-8
    grad_clip: float | None = None
    accumulate: int = 1
    ema_decay: float | None = None


@dataclass
class TrackConfig:
    """Prompt/patch-token statistics tracked during training (``selfprompt.analysis``), for prompted methods.

    Attributes:
        every: Record them at initialisation (epoch 0), every this many epochs and after the last epoch, into
            ``analysis.jsonl``/``analysis.csv`` beside each stage's metrics; 0 tracks nothing.
        probe_images: Size of the fixed probe batch: training images with eval transforms, drawn once with
            the run's seed.
        bins: Quantile bins of the NMI estimator; None picks floor(sqrt(D / 5)).
        projection_tokens: Patch tokens per layer saved (with the prompts) at the start and the end, for
            the 2-D projection of ``selfprompt analyze``.
    """

    every: int = 0
    probe_images: int = 16
    bins: int | None = None
    projection_tokens: int = 256


@dataclass
class RunOptions:
    """How a run executes, shared by training and pretraining.

    Attributes:
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        precision: auto (bf16 autocast on CUDA with bf16 support, else fp32), fp32 or bf16.
        resume: Continue the run in output_dir from its last checkpoint; refused if the config changed.
        tensorboard: Also write TensorBoard event files (needs the tensorboard package).
        progress: Show progress bars.
    """

    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """From nested plain data (a parsed recipe or a run's saved config.yaml): sections (fields whose
        default is a dataclass) are built from their dicts; missing fields keep their defaults."""
        kwargs = dict(d)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default) and isinstance(kwargs.get(f.name), dict):
                kwargs[f.name] = type(default)(**kwargs[f.name])
        return cls(**kwargs)


@dataclass
class TrainConfig(RunOptions):
    """A training run under the evaluation protocol: tune on val, then train on train+val, test once.

    Attributes:
        model: Backbone and method.
        data: Dataset and preprocessing.
        optim: Optimizer and schedule.
        track: Prompt/patch-token statistics recorded during training.
        output_dir: Run directory (config, metrics, checkpoints, adapters, results).
        stage: tune (train on train, select on val), final (train on train+val, evaluate test once) or both.
        seeds: One run per seed; results report their mean and standard deviation.
        eval_every: Evaluate on val every this many epochs while tuning (and always after the last).
        unsafe_select_on_test: UNSAFE, for reproducing the official code only: the final stage evaluates
            test every epoch and reports the best epoch. Results are marked as selected on test.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    output_dir: str = "runs/default"
    stage: Literal["tune", "final", "both"] = "both"
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_every: int = 1
    unsafe_select_on_test: bool = False


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config data as ``section.field`` -> value (``backbone_kwargs`` stays one value)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat |= flatten(v, key + ".") if isinstance(v, dict) and k != "backbone_kwargs" else {key: v}
    return flat


# fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "progress", "data.num_workers", "tensorboard"}
