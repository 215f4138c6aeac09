"""Pictures of runs, drawn with matplotlib (Agg, no display): each PNG is written with a JSON sidecar
(``<name>.plot.json``, :func:`sidecar`) holding exactly the numbers it plots, so a test or a user can read
them back.

- :func:`training_curves`: a stage's train loss, evaluated accuracy and learning rate per epoch
  (``curves.png`` in every stage folder);
- :func:`confusion_picture`: ``selfprompt eval --plot``'s confusion matrix and per-class accuracy;
- :func:`sweep_picture`: a sweep's validation accuracy per setting and its trials' per-epoch curves;
- :func:`image_grid`: ``selfprompt predict --grid``'s images with their top classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "pictures need matplotlib, a dependency of selfprompt: pip install matplotlib."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sidecar(picture: str | Path) -> Path:
    """The JSON beside ``picture`` with the numbers it plots (``curves.png`` -> ``curves.plot.json``)."""
    return Path(picture).with_suffix(".plot.json")


def _save(path: Path, draw: Callable[[Any], Any], numbers: dict[str, Any]) -> Path:
    """Draw with ``draw(plt) -> figure``, write ``path`` and its sidecar atomically, close the figure."""
    plt = _pyplot()
    figure = draw(plt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda p: figure.savefig(p, dpi=110, format="png", bbox_inches="tight"))
    finally:
        plt.close(figure)
    text = json.dumps(numbers, indent=1) + "\n"
    atomic_write(sidecar(path), lambda p: Path(p).write_text(text))
    return path


def training_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train loss, every evaluated ``<split>_acc`` and the learning rate per epoch of ``rows`` (a stage's
    metrics rows)."""
    epochs = [row["epoch"] for row in rows]
    accuracy_keys = sorted({k for row in rows for k in row if k.endswith("_acc")})
    numbers: dict[str, Any] = {
        "epoch": epochs,
        "train_loss": [row["train_loss"] for row in rows],
        "lr": [row["lr"] for row in rows],
        **{key: [[row["epoch"], row[key]] for row in rows if key in row] for key in accuracy_keys},
    }

    def draw(plt):
        figure, (loss, accuracy, lr) = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
        loss.plot(epochs, numbers["train_loss"], marker=".")
        loss.set(title="train loss", xlabel="epoch")
        for key in accuracy_keys:
            at, values = zip(*numbers[key], strict=True)
            accuracy.plot(at, [100 * v for v in values], marker=".", label=key)
        accuracy.set(title="accuracy (%)", xlabel="epoch")
        if accuracy_keys:
            accuracy.legend()
        lr.plot(epochs, numbers["lr"], marker=".")
        lr.set(title="learning rate (end of epoch)", xlabel="epoch")
        figure.suptitle(title)
        return figure

    return _save(Path(path), draw, numbers)


def confusion_picture(
    matrix: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """The confusion matrix (rows: true class, columns: predicted; counts) and each class's accuracy."""
    counts = matrix.long().tolist()
    totals = matrix.sum(1).clamp(min=1)
    per_class = (matrix.diag() / totals).tolist()
    numbers = {"classes": list(classes), "confusion": counts, "per_class_accuracy": per_class}
    size = max(4.0, 0.35 * len(classes) + 2)

    def draw(plt):
        figure, (grid, bars) = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
        grid.imshow(matrix.numpy(), cmap="Blues")
        grid.set(title="confusion (rows: true)", xlabel="predicted", ylabel="true")
        ticks = range(len(classes))
        grid.set_xticks(ticks, classes, rotation=90, fontsize=7)
        grid.set_yticks(ticks, classes, fontsize=7)
        bars.barh(list(ticks), [100 * a for a in per_class])
        bars.set_yticks(ticks, classes, fontsize=7)
        bars.invert_yaxis()
        bars.set(title="per-class accuracy (%)", xlim=(0, 100))
        figure.suptitle(title)
        return figure

    return _save(Path(path), draw, numbers)


def sweep_picture(
    scores: dict[str, float | None], curves: dict[str, list[list[float]]], path: str | Path, title: str = ""
) -> Path:
    """A sweep: each setting's score (validation accuracy; None: not finished) and each trial's validation
    accuracy per epoch (``[[epoch, accuracy], ...]``)."""
    numbers = {"scores": scores, "curves": curves}

    def draw(plt):
        figure, (bars, lines) = plt.subplots(
            1, 2, figsize=(12, max(3.2, 0.3 * len(scores) + 1)), layout="constrained"
        )
        names = list(scores)
        bars.barh(range(len(names)), [100 * (v or 0.0) for v in scores.values()])
        bars.set_yticks(range(len(names)), names, fontsize=7)
        bars.invert_yaxis()
        bars.set(title="validation accuracy (%), last epoch", xlim=(0, 100))
        for name, curve in curves.items():
            if curve:
                at, values = zip(*curve, strict=True)
                lines.plot(at, [100 * v for v in values], marker=".", label=name)
        lines.set(title="validation accuracy per epoch (%)", xlabel="epoch")
        if curves:
            lines.legend(fontsize=6)
        figure.suptitle(title)
        return figure

    return _save(Path(path), draw, numbers)


def image_grid(images: Sequence[Any], captions: Sequence[str], path: str | Path, columns: int = 6) -> Path:
    """``images`` (PIL images) in a grid, each above its caption."""
    numbers = {"captions": list(captions)}
    rows = max(1, -(-len(images) // columns))

    def draw(plt):
        figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
        for index, ax in enumerate(axes.flat):
            ax.axis("off")
            if index < len(images):
                ax.imshow(images[index])
                ax.set_title(captions[index], fontsize=7)
        return figure

    return _save(Path(path), draw, numbers)
