"""Using a trained run: evaluate it on a split, classify image files."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write
from selfprompt.config import TrainConfig
from selfprompt.data import IMAGE_EXTENSIONS
from selfprompt.data.datasets import load_split
from selfprompt.data.images import load_rgb
from selfprompt.data.splits import build_splits
from selfprompt.engine.distributed import Context, resolve_device
from selfprompt.engine.loop import evaluate
from selfprompt.engine.rundir import TrainingDir
from selfprompt.engine.tta import PromptTuner, TPTConfig
from selfprompt.pictures import confusion_picture, image_grid
from selfprompt.serving.loading import load_source_model

import torch

PROTOCOL_SPLITS = ("train", "val", "trainval", "test")
GRID_IMAGES = 48  # predict --grid draws at most this many images (the first, in the rows' order)


def evaluate_run(
    source: str | Path,
    split: str,
    seed: int | None,
    stage: str | None,
    device: str,
    ema: bool = False,
    tpt: TPTConfig | None = None,
    plot: bool = False,
    check_weights: bool = True,
    images: str | Path | None = None,
    backbone: str | None = None,
) -> dict[str, Any]:
    """Accuracy and loss of a trained model (a run folder's ``seed``/``stage``, or an adapter folder) on one
    of its run's splits, or on ``images`` (a folder with one subfolder of images per class, named as the
    model's classes; an adapter folder needs it), preprocessed as the model was trained; with ``tpt``, under
    test-time prompt tuning (and its seconds per image); with ``plot``, its confusion matrix and per-class
    accuracy as ``confusion_<split>.png`` (with its .plot.json and a .csv) in the stage folder (for an adapter
    folder: the current folder); ``backbone`` and ``check_weights``: :func:`load_source_model`'s."""
    if images is None and split not in PROTOCOL_SPLITS:
        raise ValueError(
            f"split must be one of {PROTOCOL_SPLITS} (the run's configured splits), got {split!r}."
        )
    model, found = load_source_model(source, seed, stage, ema, backbone, check_weights)
    model.to(resolve_device(device))
    cfg = found.run_config or TrainConfig()
    classes = model.task_info.labels
    if images is not None:
        folder = Path(images).expanduser().resolve()
        transform = found.transform(model.backbone)
        dataset = load_split(
            folder.parent, "folder", folder.name, transform, classes=classes, option="--images"
        )
        split = folder.name
    elif found.run is None:
        raise ValueError(
            f"{source} is an adapter folder: it holds no data. Pass --images FOLDER (one subfolder of images "
            f"per class, named as its classes: {', '.join(classes[:5])}{', ...' * (len(classes) > 5)})."
        )
    else:
        dataset = getattr(build_splits(cfg.data, model.backbone), split)
        if dataset is None:
            raise ValueError(
                f"{source} was trained on data without a test split (data.test_split null): pass --split "
                "val, or classify a folder of images with selfprompt predict RUN FOLDER."
            )
    ctx = Context(rank=0, world_size=1, device=next(model.parameters()).device)
    net = PromptTuner(model, tpt) if tpt is not None else model
    started = time.perf_counter()
    args = (net, dataset, ctx, cfg.data.eval_batch_size, cfg.precision, cfg.data.num_workers)
    scores = evaluate(*args, confusion=plot)
    matrix = scores.pop("confusion", None)
    where = found.adapter.parent if found.run is not None else Path.cwd()
    stage = (model.task_info.training or {}).get("stage", stage)
    row = {"run": str(source), "split": split, "stage": stage, "images": len(dataset), **scores}
    if matrix is not None:
        picture = TrainingDir(where).confusion(split)
        confusion_picture(matrix, classes, picture, title=f"{source} {stage or ''} on {split}")
        _write_confusion_csv(matrix, classes, picture.with_suffix(".csv"))
        row["plot"] = str(picture)
    if tpt is not None:
        row |= {
            "tta": "tpt",
            **asdict(tpt),
            "seconds_per_image": (time.perf_counter() - started) / len(dataset),
        }
    return row


def _write_confusion_csv(matrix: torch.Tensor, classes: list[str], path: Path) -> None:
    """One row per true class: its count predicted as each class, then its accuracy."""
    rows = [["true \\ predicted", *classes, "accuracy"]]
    for index, (name, counts) in enumerate(zip(classes, matrix.long().tolist(), strict=True)):
        total = sum(counts)
        rows.append([name, *counts, counts[index] / total if total else ""])
    atomic_write(path, lambda p: p.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n"))


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
    source: str | Path,
    inputs: list[str],
    seed: int | None,
    stage: str | None,
    device: str,
    ema: bool = False,
    topk: int = 1,
    batch_size: int = 64,
    tpt: TPTConfig | None = None,
    grid: str | Path | None = None,
    check_weights: bool = True,
    backbone: str | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file (folders are searched recursively) by the model of
    an adapter folder or of a run folder's ``seed``/``stage`` (:func:`selfprompt.engine.trained.find_stage`;
    None: final, else tune), with its own class names and preprocessing; with ``tpt``, each image's prompts
    are first tuned on its own views (:mod:`selfprompt.engine.tta`); ``backbone`` and ``check_weights``:
    :func:`~selfprompt.serving.loading.load_source_model`'s.

    A file that cannot be read as an image does not stop the others: its row holds ``path`` and ``error``
    (what is wrong and the fix) and no classes; when any file failed, every row has an ``error`` column.
    With ``grid`` (a .png path), the first :data:`GRID_IMAGES` images are drawn there with their top class
    and its probability (its .plot.json holds the captions).
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"--topk must be an integer >= 1 (classes reported per image), got {topk!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    files = _image_files(inputs)
    model, found = load_source_model(source, seed, stage, ema, backbone, check_weights)
    model.to(resolve_device(device))
    classes = model.task_info.labels
    transform = found.transform(model.backbone)
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
    if grid is not None:
        _draw_grid(ordered, Path(grid))
    if any("error" in row for row in ordered):
        ordered = [row if "error" in row else {**row, "error": ""} for row in ordered]
    return ordered


def _draw_grid(rows: list[dict[str, Any]], path: Path) -> None:
    """The first :data:`GRID_IMAGES` readable images of ``rows`` with their top class and probability."""
    shown = [row for row in rows if "error" not in row][:GRID_IMAGES]
    images = [load_rgb(Path(row["path"])) for row in shown]
    for image in images:
        image.thumbnail((160, 160))
    top = ("class", "probability") if "class" in (shown[0] if shown else {}) else ("class_1", "probability_1")
    captions = [f"{Path(r['path']).name}\n{r[top[0]]} ({100 * r[top[1]]:.0f}%)" for r in shown]
    image_grid(images, captions, path)
