"""Typed run configuration: what a recipe (YAML) holds and the command line overrides field by field.

``TrainConfig`` is composed here: the run's own fields, ``model``, ``data``, ``optim``, ``track``, and one
section per settings section the method registry holds (e.g. ``prompt``), so a method's settings are
declared once, in its module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from selfprompt.data import registry
from selfprompt.data.config import DataConfig
from selfprompt.methods import method_names, settings_sections
from selfprompt.methods.settings import in_range, is_integer, positive_int

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
        subspace_rank: SubPT: after ``subspace_steps`` optimizer steps, project each prompted layer's prompt
            gradient onto the top ``subspace_rank`` directions (in the D-dimensional token space) of the
            gradients of those first steps (methods with prompts only); None disables the projection.
        subspace_steps: The early optimizer steps whose gradients define the subspace.
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
    subspace_rank: int | None = None
    subspace_steps: int = 20


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
        progress: Show progress bars (on a terminal only; a log gets one line per epoch).
        plots: Draw each training stage's curves (``curves.png``: train loss, accuracy, lr per epoch).
        compile: torch.compile the training forward and backward (mode "default"; see engine/speed.py).
        fused_adamw: AdamW's fused kernel on CUDA (one launch for every parameter); ignored on CPU.
        tf32: TF32 matmuls and convolutions in fp32 on GPUs that have them (Ampere and later).
        backbone_dtype: fp32, or bf16: the frozen backbone's weights held in bf16 (trainable parameters
            stay fp32); needs precision bf16.
        checkpointing: Recompute each block's activations in the backward pass instead of keeping them
            (less memory, about one more forward pass of time; every method whose blocks run through
            ViTClassifier.forward_features, i.e. all but gapt).
        device_data: Keep the decoded training images on the device after the first epoch (one tensor);
            needs data.augment none.
    """

    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    plots: bool = True
    # engine options: how fast a run goes, recorded in env.json (engine/speed.py)
    compile: bool = False
    fused_adamw: bool = True
    tf32: bool = True
    backbone_dtype: Literal["fp32", "bf16"] = "fp32"
    checkpointing: bool = False
    device_data: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """From nested plain data (a parsed recipe or a run's saved config.yaml): sections (fields whose
        default is a dataclass) are built from their dicts; missing fields keep their defaults."""
        kwargs = migrate(d)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default) and f.name in kwargs:
                if not isinstance(kwargs[f.name], dict):
                    raise ValueError(
                        f"config section {f.name} must be a mapping of its fields, got "
                        f"{type(kwargs[f.name]).__name__} {kwargs[f.name]!r}."
                    )
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


# fields that may change between a run and its resumption (output_dir: the folder may have moved)
RESUMABLE_CHANGES = {"resume", "progress", "plots", "data.num_workers", "tensorboard", "output_dir"}
RESUMABLE_CHANGES |= {"compile", "fused_adamw", "tf32", "checkpointing", "device_data"}  # speed only


class ConfigError(ValueError):
    """Config values that cannot run; the message names every such field and how to fix it."""


def optim_problems(optim: OptimConfig) -> list[str]:
    """What is wrong with an OptimConfig, one ``field: what it must be`` line each."""
    out = []
    if not in_range(optim.lr, 0, math.inf, low_open=True):
        out.append(f"optim.lr must be a finite number > 0 (e.g. 1e-3), got {optim.lr!r}")
    if not in_range(optim.min_lr, 0, math.inf):
        out.append(f"optim.min_lr must be a finite number >= 0, got {optim.min_lr!r}")
    for name in ("weight_decay", "head_weight_decay"):
        if not in_range(getattr(optim, name), 0, math.inf):
            out.append(f"optim.{name} must be a finite number >= 0, got {getattr(optim, name)!r}")
    if len(optim.betas) != 2 or not all(in_range(b, 0, 1) for b in optim.betas):
        out.append(f"optim.betas must be two numbers in [0, 1) (e.g. [0.9, 0.999]), got {optim.betas!r}")
    if not positive_int(optim.epochs):
        out.append(f"optim.epochs must be an integer >= 1, got {optim.epochs!r}")
    if not positive_int(optim.warmup_epochs, 0):
        out.append(f"optim.warmup_epochs must be an integer >= 0, got {optim.warmup_epochs!r}")
    elif positive_int(optim.epochs) and optim.warmup_epochs > optim.epochs:
        out.append(
            f"optim.warmup_epochs ({optim.warmup_epochs}) must not exceed optim.epochs ({optim.epochs}): "
            "the learning rate would never reach optim.lr"
        )
    if optim.grad_clip is not None and not in_range(optim.grad_clip, 0, math.inf, low_open=True):
        out.append(f"optim.grad_clip must be a finite number > 0 or null, got {optim.grad_clip!r}")
    if not positive_int(optim.accumulate):
        out.append(f"optim.accumulate must be an integer >= 1, got {optim.accumulate!r}")
    if optim.ema_decay is not None and not in_range(optim.ema_decay, 0, 1, low_open=True):
        out.append(f"optim.ema_decay must be in (0, 1) (e.g. 0.999) or null, got {optim.ema_decay!r}")
    if optim.subspace_rank is not None and not positive_int(optim.subspace_rank):
        out.append(f"optim.subspace_rank must be an integer >= 1 or null (off), got {optim.subspace_rank!r}")
    if not positive_int(optim.subspace_steps):
        out.append(f"optim.subspace_steps must be an integer >= 1, got {optim.subspace_steps!r}")
    return out


def batch_problems(data: Any) -> list[str]:
    """Batch sizes and workers of a data section (training's or pretraining's)."""
    out = [
        f"data.{name} must be an integer >= 1, got {getattr(data, name)!r}"
        for name in ("batch_size", "eval_batch_size")
        if not positive_int(getattr(data, name))
    ]
    if not positive_int(data.num_workers, 0):
        out.append(f"data.num_workers must be an integer >= 0, got {data.num_workers!r}")
    return out


def _nonfinite_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """``section.field`` -> value for each number field of the dataclass ``config`` (sections included) that
    holds inf or nan, itself or in its tuple."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found |= _nonfinite_fields(value, f"{name}.")
            continue
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            found[name] = value
    return found


def raise_problems(problems: list[str], config: Any) -> None:
    """Raise :class:`ConfigError` naming ``problems``, and every number field of ``config`` that holds inf
    or nan that no problem names already (a field without a range of its own must still be finite)."""
    problems = problems + [
        f"{name} must be a finite number, got {value!r}"
        for name, value in _nonfinite_fields(config).items()
        if not any(p.startswith(f"{name} ") for p in problems)
    ]
    if problems:
        raise ConfigError(
            "Invalid config (fix these with --<field> VALUE or in the recipe):\n  " + "\n  ".join(problems)
        )


def check_config(cfg: Any) -> None:
    """Refuse a TrainConfig whose values cannot run, before anything is created or written.

    Raises:
        ConfigError: Every field that is out of range, with what it must be.
    """
    problems = []
    model, data = cfg.model, cfg.data
    if not in_range(model.drop_path, 0, 1):
        problems.append(f"model.drop_path must be in [0, 1), got {model.drop_path!r}")
    if not in_range(model.head_init_std, 0, math.inf):
        problems.append(f"model.head_init_std must be a finite number >= 0, got {model.head_init_std!r}")
    problems += batch_problems(data)
    if data.benchmark is not None and data.benchmark not in registry.names():
        problems.append(
            f"data.benchmark must be a registered benchmark, one of {registry.spelled()} (selfprompt data "
            f"list), got {data.benchmark!r}"
        )
    if not in_range(data.val_fraction, 0, 1, low_open=True):
        problems.append(f"data.val_fraction must be in (0, 1), got {data.val_fraction!r}")
    if data.img_size is not None and not positive_int(data.img_size):
        problems.append(f"data.img_size must be an integer >= 1 or null, got {data.img_size!r}")
    problems += optim_problems(cfg.optim)
    track = cfg.track
    if not positive_int(track.every, 0):
        problems.append(f"track.every must be an integer >= 0 (0: off), got {track.every!r}")
    if not positive_int(track.probe_images):
        problems.append(f"track.probe_images must be an integer >= 1, got {track.probe_images!r}")
    if track.bins is not None and not positive_int(track.bins, 2):
        problems.append(f"track.bins must be an integer >= 2 or null, got {track.bins!r}")
    if not positive_int(track.projection_tokens):
        problems.append(f"track.projection_tokens must be an integer >= 1, got {track.projection_tokens!r}")
    seeds = cfg.seeds
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(is_integer(s) for s in seeds):
        problems.append(f"seeds must be a non-empty list of integers (e.g. [0, 1, 2]), got {seeds!r}")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"seeds lists a seed twice ({seeds}); each seed is one run, list it once")
    if not positive_int(cfg.eval_every):
        problems.append(f"eval_every must be an integer >= 1, got {cfg.eval_every!r}")
    if cfg.stage not in ("tune", "final", "both"):
        problems.append(f"stage must be tune, final or both, got {cfg.stage!r}")
    elif cfg.stage != "tune" and data.test_split is None:
        problems.append(
            f"stage {cfg.stage} evaluates the final model on data.test_split, which is null (no test split): "
            "pass --data.test_split NAME, or --stage tune"
        )
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir.strip():
        problems.append(f"output_dir must name a folder, got {cfg.output_dir!r}")
    for section in settings_sections().values():
        settings = getattr(cfg, section.name, None)
        if hasattr(settings, "problems"):
            problems += [f"{section.name}.{problem}" for problem in settings.problems()]
    problems += engine_problems(cfg, augment=data.augment, tracking=bool(track.every))
    raise_problems(problems, cfg)


def engine_problems(run: RunOptions, *, augment: str, tracking: bool) -> list[str]:
    """What the engine options of ``run`` cannot do with the data's ``augment`` and prompt ``tracking``."""
    problems = [
        f"{name} must be true or false, got {getattr(run, name)!r}"
        for name in ("compile", "fused_adamw", "tf32", "checkpointing", "device_data")
        if not isinstance(getattr(run, name), bool)
    ]
    if run.backbone_dtype not in ("fp32", "bf16"):
        problems.append(f"backbone_dtype must be fp32 or bf16, got {run.backbone_dtype!r}")
    elif run.backbone_dtype == "bf16" and run.precision != "bf16":
        problems.append(
            f"backbone_dtype bf16 runs the backbone under bf16 autocast: set --precision bf16 (got "
            f"{run.precision!r}) or --backbone_dtype fp32"
        )
    elif run.backbone_dtype == "bf16" and tracking:
        problems.append("backbone_dtype bf16 cannot record prompt statistics: set --track.every 0")
    if run.device_data is True and augment != "none":
        problems.append(
            f"device_data keeps each image as first decoded, so it cannot re-draw data.augment {augment!r} "
            f"every epoch: set --data.augment none or --device_data false"
        )
    return problems


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
