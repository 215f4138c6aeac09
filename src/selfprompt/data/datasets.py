"""Image classification splits on disk (class folders or VTAB-style list files), checked when loaded."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# what PIL raises for a missing, unidentifiable, truncated or oversized file
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_SHOWN = 5  # offending files named in one error message

Sample = tuple[Path, int]
T = TypeVar("T")


class ImageDataset(Dataset):
    """``(path, label)`` samples read with PIL (converted to RGB), then transformed.

    Args:
        samples: Absolute image paths and their labels.
        classes: Class names; a name's index is its label.
        root: The dataset folder; :meth:`fingerprint` hashes paths relative to it.
        transform: Applied to each PIL image; None returns the image itself.
    """

    def __init__(
        self,
        samples: Iterable[tuple[str | os.PathLike, int]],
        classes: list[str],
        root: str | os.PathLike,
        transform: Callable | None = None,
    ) -> None:
        self.samples: list[Sample] = [(Path(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.root = Path(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except _READ_ERRORS as error:
            raise RuntimeError(f"Cannot read image {path} ({error}); remove or replace the file.") from error
        return (rgb if self.transform is None else self.transform(rgb)), label

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the sorted ``relative/path<TAB>label`` lines: the same data list gives the same hash."""
        lines = sorted(
            f"{Path(os.path.relpath(path, self.root)).as_posix()}\t{label}" for path, label in self.samples
        )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_split(
    root: str | os.PathLike,
    layout: Literal["folder", "list"],
    split: str,
    transform: Callable | None = None,
    *,
    classes: list[str] | None = None,
    check_images: bool = True,
) -> ImageDataset:
    """Load one split of a dataset, checking it before any training starts.

    Layouts:
        ``folder``: ``root/<split>/<class_name>/<image>`` (direct files with an :data:`IMAGE_EXTENSIONS`
        suffix, any case; hidden files and folders are skipped). Classes are the sorted class folder names.
        ``list``: ``root/<split>.txt`` (VTAB-1k: ``train800``, ``val200``, ``train800val200``, ``test``),
        one ``relative/path label`` line per image, paths relative to ``root``. Classes are the lines of
        ``root/classes.txt`` when it exists, else ``"0"`` .. ``str(max label)``.

    Args:
        root: The dataset folder.
        layout: ``folder`` or ``list``.
        split: The split folder or list file name, without ``.txt``.
        transform: Applied to each PIL image.
        classes: The label mapping to use instead (val/test splits: pass the train split's classes).
        check_images: Read every image's header now, so that a corrupt file fails here, not mid-training.

    Raises:
        FileNotFoundError: A missing root, split or listed image.
        ValueError: An empty split or class folder, an unknown class folder, a malformed list line, a label
            outside the classes, or (``check_images``) an unreadable image.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset root {root} is not a folder; pass the folder that holds the splits."
        )
    if layout == "folder":
        samples, names = _folder_samples(root, split, classes)
    elif layout == "list":
        samples, names = _list_samples(root, split, classes)
    else:
        raise ValueError(
            f"Unknown layout {layout!r} for {root}; use 'folder' (root/<split>/<class>/<image>) or "
            "'list' (root/<split>.txt)."
        )
    if check_images:
        _check_headers(samples)
    return ImageDataset(samples, names, root, transform)


def _folder_samples(root: Path, split: str, classes: list[str] | None) -> tuple[list[Sample], list[str]]:
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise FileNotFoundError(
            f"Split folder {split_dir} does not exist; splits in {root}: {', '.join(found) or 'none'}. "
            "Pass one of them, or lay the data out as root/<split>/<class_name>/<image>."
        )
    folders = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(
            f"Split folder {split_dir} is empty: it holds no class folders. Put each class's images in "
            f"{split_dir}/<class_name>/."
        )
    names = [d.name for d in folders] if classes is None else list(classes)
    index = {name: label for label, name in enumerate(names)}
    unknown = [d for d in folders if d.name not in index]
    if unknown:
        raise ValueError(
            f"Class folder {unknown[0]} is not one of the {len(names)} classes given (those of the training "
            f"split{f'; {len(unknown)} such folders' if len(unknown) > 1 else ''}); rename or remove it."
        )
    samples: list[Sample] = []
    for folder in folders:
        files = sorted(
            f
            for f in folder.iterdir()
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
        )
        if not files:
            raise ValueError(
                f"Class folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}); add images or remove "
                "the folder."
            )
        samples += [(f, index[folder.name]) for f in files]
    return samples, names


def _list_samples(root: Path, split: str, classes: list[str] | None) -> tuple[list[Sample], list[str]]:
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        found = sorted(p.stem for p in root.glob("*.txt") if p.name != "classes.txt")
        raise FileNotFoundError(
            f"Split list {list_file} does not exist; split lists in {root}: {', '.join(found) or 'none'}. "
            "Pass one of them, or write one '<relative/image/path> <label>' line per image."
        )
    parsed, bad = parse_list(list_file)
    if bad:
        number, line = bad[0]
        raise ValueError(
            f"{list_file}:{number}: cannot parse {line!r}; each line must be "
            "'<relative/image/path> <integer label>'. Fix or remove the line."
        )
    entries = [(number, root / path, label) for number, path, label in parsed]
    if not entries:
        raise ValueError(
            f"Split list {list_file} is empty; add one '<relative/image/path> <label>' line per image."
        )

    classes_file = root / "classes.txt"
    if classes is not None:
        names, source = list(classes), "the classes given"
    elif classes_file.is_file():
        lines = classes_file.read_text(encoding="utf-8").splitlines()
        names, source = [name.strip() for name in lines if name.strip()], str(classes_file)
    else:
        names, source = [str(i) for i in range(max(label for _, _, label in entries) + 1)], "the labels"
    for number, _, label in entries:
        if not 0 <= label < len(names):
            raise ValueError(
                f"{list_file}:{number}: label {label} is outside the valid range 0..{len(names) - 1} "
                f"({len(names)} classes from {source}); fix the label or the class list."
            )

    missing = [(number, path) for number, path, _ in entries if not path.is_file()]
    if missing:
        number, path = missing[0]
        raise FileNotFoundError(
            f"{list_file}:{number}: image {path} does not exist ({len(missing)} listed images are missing); "
            f"paths are relative to {root}. Restore the files or fix the list."
        )
    return [(path, label) for _, path, label in entries], names


def parse_list(list_file: Path) -> tuple[list[tuple[int, str, int]], list[tuple[int, str]]]:
    """A list file's ``(line number, relative path, label)`` entries, and the ``(line number, line)`` of each
    line that is not ``relative/path label`` (blank lines are skipped)."""
    entries, bad = [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            entries.append((number, parts[0].strip(), int(parts[1])))
        except (IndexError, ValueError):
            bad.append((number, line))
    return entries, bad


def _check_headers(samples: list[Sample]) -> None:
    """Open every image's header (no decoding) and name the files PIL cannot identify."""
    bad = []
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                _ = image.size
        except _READ_ERRORS as error:
            bad.append(f"{path} ({error})")
    if bad:
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise ValueError(
            f"{len(bad)} image(s) cannot be read: {'; '.join(bad[:_SHOWN])}{more}. "
            "Remove or replace these files."
        )


def merge(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    """Concatenate two disjoint splits of one dataset (e.g. train800 + val200); keeps ``a``'s transform."""
    if a.root != b.root:
        raise ValueError(f"Cannot merge splits of different datasets: {a.root} and {b.root}.")
    if a.classes != b.classes:
        raise ValueError(
            f"Cannot merge splits of {a.root} with different classes ({a.num_classes} vs {b.num_classes}); "
            "load the second with classes=first.classes."
        )
    shared = {path for path, _ in a.samples} & {path for path, _ in b.samples}
    if shared:
        raise ValueError(
            f"The splits share {len(shared)} images (e.g. {min(shared)}); merge disjoint splits only."
        )
    return ImageDataset(a.samples + b.samples, a.classes, a.root, a.transform)


def stratified_split(
    samples: Sequence[tuple[T, int]], fraction: float, seed: int
) -> tuple[list[tuple[T, int]], list[tuple[T, int]]]:
    """A seeded, per-class (stratified) split of ``(item, label)`` samples into ``(train, val)`` lists.

    Each class with n >= 2 samples gives ``round(fraction * n)`` of them to val, clamped to 1 .. n - 1 so
    that both sides see the class; a class with one sample stays in train. Both keep the input order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    generator = torch.Generator().manual_seed(seed)
    held: set[int] = set()
    for label in sorted(by_class):
        members = by_class[label]
        count = len(members)
        take = min(max(round(fraction * count), 1), count - 1)
        held.update(members[j] for j in torch.randperm(count, generator=generator)[:take].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def split_off(dataset: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A seeded, stratified split into ``(train, val)`` (:func:`stratified_split`), for datasets without a
    validation split. Both keep the dataset's transform (set ``val.transform`` to the eval transform).
    """
    train, val = stratified_split(dataset.samples, fraction, seed)
    return (
        ImageDataset(train, dataset.classes, dataset.root, dataset.transform),
        ImageDataset(val, dataset.classes, dataset.root, dataset.transform),
    )
