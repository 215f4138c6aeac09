"""Using a trained run: evaluate it on a split, classify image files."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selfprompt.data import IMAGE_EXTENSIONS
from selfprompt.data.images import load_rgb
from selfprompt.data.splits import build_splits, eval_transform
from selfprompt.engine.distributed import Context
from selfprompt.engine.loop import evaluate
from selfprompt.engine.trained import load_run_model
from selfprompt.engine.tta import PromptTuner, TPTConfig

import torch

PROTOCOL_SPLITS = ("train", "val", "trainval", "test")


def evaluate_run(
    run_dir: str | Path,
    split: str,
    seed: int | None,
    stage: str,
    device: str,
    ema: bool = False,
    tpt: TPTConfig | None = None,
    check_weights: bool = True,
) -> dict[str, Any]:
    """Accuracy and loss of a run's model on one of its splits; with ``tpt``, under test-time prompt tuning
    (and its seconds per image); ``check_weights``: :func:`load_run_model`'s."""
    if split not in PROTOCOL_SPLITS:
        raise ValueError(
            f"split must be one of {PROTOCOL_SPLITS} (the run's configured splits), got {split!r}."
        )
    cfg, model, _ = load_run_model(run_dir, seed, stage, device, ema, check_weights)
    dataset = getattr(build_splits(cfg.data, model.backbone), split)
    ctx = Context(rank=0, world_size=1, device=next(model.parameters()).device)
    net = PromptTuner(model, tpt) if tpt is not None else model
    started = time.perf_counter()
    scores = evaluate(net, dataset, ctx, cfg.data.eval_batch_size, cfg.precision, cfg.data.num_workers)
    row = {"run": str(run_dir), "split": split, "stage": stage, "images": len(dataset), **scores}
    if tpt is not None:
        row |= {
            "tta": "tpt",
            **asdict(tpt),
            "seconds_per_image": (time.perf_counter() - started) / len(dataset),
        }
    return row


def _image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():  # a folder named like an image (x.png/) is searched, not read
            files += sorted(
                p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
            )
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
    stage: str | None,
    device: str,
    ema: bool = False,
    topk: int = 1,
    batch_size: int = 64,
    tpt: TPTConfig | None = None,
    check_weights: bool = True,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file (folders are searched recursively) by the model of
    ``seed``/``stage`` (:func:`selfprompt.engine.trained.find_stage`; None: final, else tune); with ``tpt``,
    each image's prompts are first tuned on its own views (:mod:`selfprompt.engine.tta`); ``check_weights``:
    :func:`load_run_model`'s.

    A file that cannot be read as an image does not stop the others: its row holds ``path`` and ``error``
    (what is wrong and the fix) and no classes; when any file failed, every row has an ``error`` column.
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"--topk must be an integer >= 1 (classes reported per image), got {topk!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    files = _image_files(inputs)
    cfg, model, classes = load_run_model(run_dir, seed, stage, device, ema, check_weights)
    transform = eval_transform(cfg.data, model.backbone)
    net = PromptTuner(model, tpt) if tpt is not None else model
    device_ = next(model.parameters()).device
    rows: dict[Path, dict[str, Any]] = {}
    readable: list[tuple[Path, torch.Tensor]] = []
    for path in files:
        try:
            readable.append((path, transform(load_rgb(path))))
        except ValueError as error:
            rows[path] = {"path": str(path), "error": str(error)}
        if len(readable) == batch_size or (path is files[-1] and readable):
            chunk, images = zip(*readable, strict=True)
            readable = []
            probs = net(torch.stack(images).to(device_)).float().softmax(dim=1)
            top = probs.topk(min(topk, len(classes)), dim=1)
            for file, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
                row: dict[str, Any] = {"path": str(file)}
                for rank, (p, i) in enumerate(zip(values, indices, strict=True), start=1):
                    suffix = "" if topk == 1 else f"_{rank}"
                    row |= {f"class{suffix}": classes[i], f"probability{suffix}": round(p, 6)}
                rows[file] = row
    ordered = [rows[path] for path in files]
    if any("error" in row for row in ordered):
        ordered = [row if "error" in row else {**row, "error": ""} for row in ordered]
    return ordered
