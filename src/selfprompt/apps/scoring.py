"""What ``selfprompt condense`` and ``selfprompt prune`` share: a trained run's model and the training
images of its stage to score prompts on, and the key that lets a finished scoring be reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.config import TrainConfig
from selfprompt.data.splits import build_splits
from selfprompt.engine.rundir import read_json
from selfprompt.engine.trained import load_run_model
from selfprompt.model import ViTClassifier

from torch.utils.data import DataLoader


def scoring_source(
    run_dir: str | Path, seed: int | None, stage: str, device: str, model_class: type, wanted: str
) -> tuple[TrainConfig, ViTClassifier, DataLoader, dict[str, Any]]:
    """``run_dir``'s trained model of ``seed`` and ``stage`` (a ``model_class``, else an error asking for
    ``wanted``), a loader of that stage's training images (eval transforms) and the scoring's key: source,
    method, seed, stage and the images' fingerprint."""
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


def reusable(record: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``record`` when it was written for the same ``key``, else None."""
    if not record.is_file():
        return None
    saved = read_json(record)
    return saved if {k: saved.get(k) for k in key} == key else None
