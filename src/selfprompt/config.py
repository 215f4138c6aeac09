"""Typed run configuration: what a recipe (YAML) holds and the command line overrides field by field.

``TrainConfig`` is composed here: the run's own fields, ``model``, ``data``, ``optim``, ``track``, and one
section per settings section the method registry holds (e.g. ``prompt``), so a method's settings are
declared once, in its module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from selfprompt.data.config import DataConfig
from selfprompt.methods import method_names, settings_sections

MethodName = Literal[tuple(method_names())]  # type: ignore[valid-type]  (the registry's names)


@dataclass
class ModelConfig:
    """Backbone, method and head.

    Attributes:
        backbone: timm model name with its pretrained tag, e.g. vit_base_patch16_224.mae; with a checkpoint
            it names the architecture, and null infers it from the checkpoint (standard ViT widths).
        checkpoint: Backbone weights file in any supported layout, recognised from its keys: timm .pth or
            .safetensors, MAE pretraining/fine-tuning, MoCo v3 pretraining/linear-probe, DINO, JAX .npz.
            None uses timm's own pretrained weights (cache, zoo or hub) when pretrained is true.
        pretrained: Load timm's pretrained weights for backbone (a checkpoint is always loaded).
        backbone_kwargs: Extra keyword arguments for timm.create_model (e.g. img_size, patch_size, depth).
        method: The PETL method: {methods}.
        pool: token, avg or mae (the official SPT MAE head); None: mae for MAE weights, else the
            backbone's own pooling (the class token for supervised, MoCo v3 and DINO ViTs).
        head_init_std: Std of the head's truncated-normal init (SPT: 0.02; 0.01 for MoCo v3).
        drop_path: Backbone stochastic depth; acts only when the backbone trains (full).
    """

    backbone: str | None = "vit_base_patch16_224.mae"
    checkpoint: str | None = None
    pretrained: bool = True
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method: MethodName = "spt-deep"
    pool: Literal["token", "avg", "mae"] | None = None
    head_init_std: float = 0.02
    drop_path: float = 0.0


ModelConfig.__doc__ = ModelConfig.__doc__.format(methods=", ".join(method_names()))


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
        kwargs = migrate(d)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default) and isinstance(kwargs.get(f.name), dict):
                kwargs[f.name] = type(default)(**kwargs[f.name])
        return cls(**kwargs)


@dataclass
class _RunConfig(RunOptions):
    """A training run under the evaluation protocol: tune on val, then train on train+val, test once.

        Attributes:
            model: Backbone and method.
            data: Dataset and preprocessing.
            optim: Optimizer and schedule.
            track: Prompt/patch-token statistics recorded during training.
            output_dir: Run directory (config, metrics, checkpoints, adapters, results).
            stage: tune (train on train, select on val), final (train on train+val, evaluate test once)
                or both.
            seeds: One run per seed; results report their mean and standard deviation.
            eval_every: Evaluate on val every this many epochs while tuning (and always after the last).
            unsafe_select_on_test: UNSAFE, for reproducing the official code only: the final stage evaluates
                test every epoch and reports the best epoch. Results are marked as selected on test.
    {sections}"""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    output_dir: str = "runs/default"
    stage: Literal["tune", "final", "both"] = "both"
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_every: int = 1
    unsafe_select_on_test: bool = False


def _with_settings(base: type) -> type:
    """``base`` plus a field per registered settings section (``prompt``, ...), documented for ``--help``."""
    sections = settings_sections().values()
    fields = [(s.name, s.cls, field(default_factory=s.cls)) for s in sections]
    cls = dataclasses.make_dataclass("TrainConfig", fields, bases=(base,))
    cls.__module__ = __name__
    cls.__doc__ = base.__doc__.format(sections="".join(f"        {s.name}: {s.help}\n" for s in sections))
    return cls


TrainConfig = _with_settings(_RunConfig)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config data as ``section.field`` -> value (``backbone_kwargs`` stays one value)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat |= flatten(v, key + ".") if isinstance(v, dict) and k != "backbone_kwargs" else {key: v}
    return flat


# fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "progress", "data.num_workers", "tensorboard"}


def legacy_fields() -> dict[str, str]:
    """Fields that moved: old dotted name -> new one (e.g. model.num_prompts -> prompt.num_prompts)."""
    return {old: f"{s.name}.{new}" for s in settings_sections().values() for old, new in s.legacy.items()}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Nested config data of an older layout (a recipe, a run's saved config.yaml) in the current one."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in legacy_fields().items():
        old_section, old_name = old.split(".")
        section = data.get(old_section)
        if isinstance(section, dict) and old_name in section:
            new_section, new_name = new.split(".")
            data.setdefault(new_section, {})
            if isinstance(data[new_section], dict):
                data[new_section].setdefault(new_name, section.pop(old_name))
    return data
