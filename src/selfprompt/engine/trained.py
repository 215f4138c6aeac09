"""A finished run's config and trained models, as ``eval``, ``predict``, ``analyze``, serving and the methods'
second stages (``prune``, ``condense``) read them:
the one place that says which seed and stage a command reads (default: the first seed; ``final`` if it
finished, else ``tune``) and where that stage's adapter is."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selfprompt.adapter import CONFIG_NAME
from selfprompt.config import TrainConfig
from selfprompt.data.splits import build_splits
from selfprompt.engine.build import backbone_name, create_backbone
from selfprompt.engine.distributed import resolve_device
from selfprompt.engine.result import EVAL_SPLITS
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.methods import load_pretrained
from selfprompt.model import ViTClassifier

from torch.utils.data import DataLoader


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run saved (older layouts migrated)."""
    run = RunDir(Path(run_dir))
    data = run.read_config()
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:  # a section that is not a mapping, or an unknown field
        raise ValueError(f"{run.config} does not hold a config this selfprompt reads ({error}).") from None


def stage_order(stage: str | None = None) -> tuple[str, ...]:
    """The stages to read, in turn: ``stage`` when asked for, else ``final`` (trained on train+val), then
    ``tune``."""
    return (stage,) if stage is not None else tuple(reversed(EVAL_SPLITS))


@dataclass(frozen=True)
class TrainedStage:
    """One seed and stage of a finished run: its config, folder and adapter."""

    config: TrainConfig
    seed: int
    stage: str
    folder: TrainingDir
    adapter: Path


def find_stage(
    run_dir: str | Path, seed: int | None = None, stage: str | None = None, ema: bool = False
) -> TrainedStage:
    """The finished ``seed`` (default: the run's first) and ``stage`` (default: final if it finished, else
    tune) of a run, with its adapter (``ema``: the EMA weights'); an error names what is missing."""
    cfg = load_run_config(run_dir)
    seed = cfg.seeds[0] if seed is None else seed
    run = RunDir(Path(run_dir))
    stages = stage_order(stage)
    for name in stages:
        folder = run.stage(seed, name)
        if (folder.adapter(ema) / CONFIG_NAME).is_file():
            return TrainedStage(cfg, seed, name, folder, folder.adapter(ema))
    raise FileNotFoundError(
        f"{run.stage(seed, stages[0]).adapter(ema)} does not exist: seed {seed}, stage {' or '.join(stages)} "
        f"has not finished in {run_dir} (seeds: {cfg.seeds}; stages: {', '.join(EVAL_SPLITS)}"
        f"{'; EMA needs optim.ema_decay' if ema else ''})."
    )


def load_run_model(
    run_dir: str | Path,
    seed: int | None,
    stage: str | None,
    device: str,
    ema: bool = False,
    check_weights: bool = True,
) -> tuple[TrainConfig, ViTClassifier, list[str]]:
    """The trained model of one seed and stage of a run (:func:`find_stage`), on ``device``, in eval mode,
    and its class names (``check_weights``: refuse a backbone whose weights changed since the run)."""
    found = find_stage(run_dir, seed, stage, ema)
    cfg, folder = found.config, found.folder
    backbone = create_backbone(cfg.model)
    model = load_pretrained(found.adapter, backbone, backbone_name(backbone), check_weights)
    classes = model.task_info.labels or folder.read_classes()  # runs of earlier releases: classes.json only
    if len(classes) != model.config.num_classes:
        heads = model.config.num_classes
        raise ValueError(
            f"{folder.classes} names {len(classes)} classes, the trained head has {heads}: the file does not "
            f"belong to this adapter; restore it (the class names in label order)."
        )
    if model.task_info.labels is None:
        model.task_info = replace(model.task_info, labels=classes)
    return cfg, model.to(resolve_device(device)).eval(), classes


def scoring_source(
    run_dir: str | Path, seed: int | None, stage: str, device: str, model_class: type, wanted: str
) -> tuple[TrainConfig, ViTClassifier, DataLoader, dict[str, Any]]:
    """``run_dir``'s trained model of ``seed`` and ``stage`` (a ``model_class``, else an error asking for
    ``wanted``), a loader of that stage's training images (eval transforms) and the scoring's key: source,
    method, seed, stage and the images' fingerprint. What a method's second stage scores
    (:class:`selfprompt.methods.registry.StageCommand`)."""
    cfg, model, _ = load_run_model(run_dir, seed, stage, device)
    if not isinstance(model, model_class):
        raise ValueError(f"{run_dir} trained {cfg.model.method}; {wanted}.")
    splits = build_splits(cfg.data, model.backbone)
    data = splits.init_trainval if stage == "final" else splits.init_train
    key = {
        "source": str(Path(run_dir).resolve()),
        "method": cfg.model.method,
        "seed": cfg.seeds[0] if seed is None else seed,
        "stage": stage,
        "data": data.fingerprint(),
    }
    loader = DataLoader(data, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
    return cfg, model, loader, key
