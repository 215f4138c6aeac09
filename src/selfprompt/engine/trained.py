"""A finished run's config and trained models, as ``eval``, ``predict`` and serving load them."""

from __future__ import annotations

from pathlib import Path

from selfprompt.config import TrainConfig
from selfprompt.engine.build import backbone_name, create_backbone
from selfprompt.engine.distributed import resolve_device
from selfprompt.engine.rundir import RunDir
from selfprompt.methods import load_pretrained
from selfprompt.model import ViTClassifier


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run saved (older layouts migrated)."""
    run = RunDir(Path(run_dir))
    data = run.read_config()
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:  # a section that is not a mapping, or an unknown field
        raise ValueError(f"{run.config} does not hold a config this selfprompt reads ({error}).") from None


def load_run_model(
    run_dir: str | Path, seed: int | None, stage: str, device: str, ema: bool = False
) -> tuple[TrainConfig, ViTClassifier, list[str]]:
    """The trained model of one seed and stage of a run, on ``device``, in eval mode, and its class names."""
    cfg = load_run_config(run_dir)
    seed = cfg.seeds[0] if seed is None else seed
    folder = RunDir(Path(run_dir)).stage(seed, stage)
    adapter = folder.adapter(ema)
    if not adapter.is_dir():
        raise FileNotFoundError(
            f"{adapter} does not exist: seed {seed}, stage {stage!r} has not finished in {run_dir} "
            f"(seeds: {cfg.seeds}; stages: tune, final{'; EMA needs optim.ema_decay' if ema else ''})."
        )
    backbone = create_backbone(cfg.model)
    model = load_pretrained(adapter, backbone, backbone_name(backbone))
    classes = folder.read_classes()
    if len(classes) != model.config.num_classes:
        heads = model.config.num_classes
        raise ValueError(
            f"{folder.classes} names {len(classes)} classes, the trained head has {heads}: the file does not "
            f"belong to this adapter; restore it (the class names in label order)."
        )
    return cfg, model.to(resolve_device(device)).eval(), classes
