"""One's own image folder: ``DIR/train/<class>/<image>``, with an optional ``DIR/val/`` (or ``validation/``)
and ``DIR/test/``: which splits it has, the data settings that read them, and its check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.data.datasets import IMAGE_EXTENSIONS, ImageDataset, load_split
from selfprompt.data.manifest import file_hash

TRAIN = "train"
VAL = ("val", "validation")  # the names a validation folder goes by
TEST = "test"
LAYOUT = f"DIR/{TRAIN}/<class>/<image>, optional DIR/{VAL[0]}/ (or {VAL[1]}/) and DIR/{TEST}/"


@dataclass(frozen=True)
class FolderSplits:
    """The split folders found in an image folder (None: that split is not there)."""

    root: Path
    train: str
    val: str | None
    test: str | None

    def data_settings(self) -> dict[str, Any]:
        """The ``data`` fields that read these splits: no validation folder carves one out of train
        (``val_split`` null), and train + val is their merge."""
        return {
            "layout": "folder",
            "train_split": self.train,
            "val_split": self.val,
            "trainval_split": None,
            "test_split": self.test,
        }

    def describe(self) -> str:
        val = f"{self.val}/" if self.val else f"none ({TRAIN}/ gives a seeded, stratified share)"
        test = f"{self.test}/" if self.test else "none (stage tune only)"
        return f"train {self.train}/, val {val}, test {test}"


def _folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _holds_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.iterdir() if f.is_file())


def is_image_folder(root: str | Path) -> bool:
    """Whether ``root`` holds a ``train/`` folder (one's own image folder's one required split)."""
    return (Path(root).expanduser() / TRAIN).is_dir()


def find_splits(root: str | Path) -> FolderSplits:
    """The splits of one's own image folder ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or has no ``train/`` (the message says how to lay it out,
            and which option names another training folder).
        ValueError: It holds both ``val/`` and ``validation/``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass --data.root DIR with {LAYOUT}.")
    folders = _folders(root)
    if TRAIN not in folders:
        flat = [name for name in folders if _holds_images(root / name)]
        if flat and len(flat) == len(folders):
            hint = (
                f"its folders ({', '.join(flat[:5])}{', ...' if len(flat) > 5 else ''}) hold images "
                f"directly: if they are the classes, move them into {root / TRAIN}/"
            )
        else:
            hint = f"its folders: {', '.join(folders) or 'none'}; --data.train_split NAME trains on another"
        raise FileNotFoundError(
            f"{root} has no {TRAIN}/ folder ({hint}). One's own images are laid out as {LAYOUT}."
        )
    vals = [name for name in VAL if name in folders]
    if len(vals) > 1:
        raise ValueError(
            f"{root} holds both {VAL[0]}/ and {VAL[1]}/; pass --data.val_split {VAL[0]} or --data.val_split "
            f"{VAL[1]} (or --data.val_split null to carve one out of {TRAIN}/)."
        )
    return FolderSplits(root, TRAIN, vals[0] if vals else None, TEST if TEST in folders else None)


def _counts(dataset: ImageDataset) -> str:
    per_class = [0] * dataset.num_classes
    for _, label in dataset.samples:
        per_class[label] += 1
    spread = f"{min(per_class)}-{max(per_class)}" if min(per_class) != max(per_class) else str(per_class[0])
    return f"{len(dataset)} images, {dataset.num_classes} classes ({spread} per class)"


def check_folder(root: str | Path, log: Callable[[str], None] = print) -> list[str]:
    """Every problem of one's own image folder (an empty list: ready to train on), logged with each split's
    counts: each split loads and decodes in full, the other splits' classes are the training split's, and no
    image (by content) is in two splits."""
    found = find_splits(root)
    problems: list[str] = []
    loaded: dict[str, ImageDataset] = {}
    classes = None
    for name, option in ((found.train, "train"), (found.val, "val"), (found.test, "test")):
        if name is None:
            carved = " (selfprompt train carves one out of train)" if option == "val" else ""
            log(f"{option}: none{carved}")
            continue
        try:
            dataset = load_split(found.root, "folder", name, classes=classes, option=f"data.{option}_split")
        except (OSError, ValueError) as error:
            problems.append(f"{name}/: {error}")
            log(f"{option}: {name}/: problem: {error}")
            if classes is None:
                break  # the other splits are read with train's classes
            continue
        loaded[name] = dataset
        classes = classes or dataset.classes
        log(f"{option}: {name}/: {_counts(dataset)}")
    seen: dict[str, str] = {}
    for name, dataset in loaded.items():
        for path, _ in dataset.samples:
            digest = file_hash(path)
            other = seen.setdefault(digest, f"{name}/{path.relative_to(dataset.root / name).as_posix()}")
            if not other.startswith(f"{name}/"):
                problems.append(
                    f"{path} is the same image as {dataset.root / other}: an image belongs to one split"
                )
                log(f"problem: {problems[-1]}")
    log("ok" if not problems else f"{len(problems)} problem(s)")
    return problems
