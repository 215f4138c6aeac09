"""Using a trained run: evaluate it on a split, classify image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.data import IMAGE_EXTENSIONS
from selfprompt.data.splits import build_splits, eval_transform
from selfprompt.engine.distributed import Context
from selfprompt.engine.loop import evaluate
from selfprompt.engine.trained import load_run_model

import torch
from PIL import Image

PROTOCOL_SPLITS = ("train", "val", "trainval", "test")


def evaluate_run(
    run_dir: str | Path, split: str, seed: int | None, stage: str, device: str, ema: bool = False
) -> dict[str, Any]:
    if split not in PROTOCOL_SPLITS:
        raise ValueError(
            f"split must be one of {PROTOCOL_SPLITS} (the run's configured splits), got {split!r}."
        )
    cfg, model, _ = load_run_model(run_dir, seed, stage, device, ema)
    dataset = getattr(build_splits(cfg.data, model.backbone), split)
    ctx = Context(rank=0, world_size=1, device=next(model.parameters()).device)
    scores = evaluate(model, dataset, ctx, cfg.data.eval_batch_size, cfg.precision, cfg.data.num_workers)
    return {"run": str(run_dir), "split": split, "stage": stage, "images": len(dataset), **scores}


def _image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder.")
    if not files:
        raise ValueError(f"No images found in {inputs} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    return files


@torch.no_grad()
def predict_run(
    run_dir: str | Path,
    inputs: list[str],
    seed: int | None,
    stage: str,
    device: str,
    ema: bool = False,
    topk: int = 1,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file (folders are searched recursively)."""
    cfg, model, classes = load_run_model(run_dir, seed, stage, device, ema)
    transform = eval_transform(cfg.data, model.backbone)
    files = _image_files(inputs)
    device_ = next(model.parameters()).device
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(transform(Image.open(path).convert("RGB")))
            except OSError as error:
                raise ValueError(f"Cannot read image {path}: {error}") from error
        probs = model(torch.stack(images).to(device_)).float().softmax(dim=1)
        top = probs.topk(min(topk, len(classes)), dim=1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            row: dict[str, Any] = {"path": str(path)}
            for rank, (p, i) in enumerate(zip(values, indices, strict=True), start=1):
                suffix = "" if topk == 1 else f"_{rank}"
                row |= {f"class{suffix}": classes[i], f"probability{suffix}": round(p, 6)}
            rows.append(row)
    return rows
