"""Image classification splits on disk (class folders or VTAB-style list files), checked when loaded."""

from __future__ import annotations

import codecs
import hashlib
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, TypeVar

from selfprompt.data.images import load_rgb, unreadable

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SHOWN = 5  # offending files named in one error message
# image formats a folder may hold that selfprompt does not read: an error, not a silently smaller class
OTHER_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jfif", ".jp2", ".j2k", ".ico", ".svg", ".psd")
_LABEL = re.compile(r"-?[0-9]+")  # a list line's label: ASCII digits only (int() also takes "1_0", "+1", "١")

Sample = tuple[Path, int]
T = TypeVar("T")


class ImageDataset(Dataset):
    """``(path, label)`` samples read as 8-bit RGB (:func:`~selfprompt.data.images.load_rgb`), transformed.

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
            rgb = load_rgb(path)
        except ValueError as error:
            raise RuntimeError(str(error)) from error
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
    option: str | None = None,
) -> ImageDataset:
    """Load one split of a dataset, checking it before any training starts.

    Layouts:
        ``folder``: ``root/<split>/<class_name>/<image>`` (direct files with an :data:`IMAGE_EXTENSIONS`
        suffix, any case; hidden files and folders are skipped). Classes are the sorted class folder names.
        ``list``: ``root/<split>.txt`` (VTAB-1k: ``train800``, ``val200``, ``train800val200``, ``test``),
        one ``relative/path label`` line per image, paths relative to ``root``. Classes are the lines of
        ``root/classes.txt`` when it exists, else ``"0"`` .. ``str(max label)`` (then every label from 0 to
        the largest must occur). List and class files are UTF-8; the rules for a line are
        :func:`parse_list`'s.

    Args:
        root: The dataset folder.
        layout: ``folder`` or ``list``.
        split: The split folder or list file name, without ``.txt``.
        transform: Applied to each PIL image.
        classes: The label mapping to use instead (val/test splits: pass the train split's classes).
        check_images: Decode every image now, as training reads it (:func:`~selfprompt.data.images.load_rgb`),
            so that a corrupt or truncated file fails here, not mid-training or after it.
        option: The config field that names this split (``data.train_split``): a missing split's error
            says to pass another with it.

    Raises:
        FileNotFoundError: A missing root, split or listed image.
        ValueError: An empty split or class folder, an unknown class folder, a list or class file that is not
            UTF-8, a malformed, absolute, escaping or repeated list line, a label outside the classes, labels
            that skip classes with no ``classes.txt``, or (``check_images``) an unreadable image.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset root {root} is not a folder; pass the folder that holds the splits."
        )
    if layout == "folder":
        samples, names = _folder_samples(root, split, classes, option)
    elif layout == "list":
        samples, names = _list_samples(root, split, classes, option)
    else:
        raise ValueError(
            f"Unknown layout {layout!r} for {root}; use 'folder' (root/<split>/<class>/<image>) or "
            "'list' (root/<split>.txt)."
        )
    if check_images:
        _check_images(samples)
    return ImageDataset(samples, names, root, transform)


# what else fixes a missing split, by the option that names it
_INSTEAD = {
    "data.val_split": " (or --data.val_split null: a seeded, stratified --data.val_fraction of the training "
    "split is carved out)",
    "data.trainval_split": " (or --data.trainval_split null: train and val merged)",
    "data.test_split": " (or --data.test_split null with --stage tune: no test split)",
}


def _pass_another(option: str | None) -> str:
    if option is None:
        return "Pass one of them"
    return f"Pass one of them with --{option} NAME{_INSTEAD.get(option, '')}"


def _folder_samples(
    root: Path, split: str, classes: list[str] | None, option: str | None = None
) -> tuple[list[Sample], list[str]]:
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise FileNotFoundError(
            f"Split folder {split_dir} does not exist; splits in {root}: {', '.join(found) or 'none'}. "
            f"{_pass_another(option)}, or lay the data out as root/<split>/<class_name>/<image>."
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
    _refuse_skipped_images(split_dir, folders)
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


def _refuse_skipped_images(split_dir: Path, folders: list[Path]) -> None:
    """Images the folder layout would leave out: in the split folder itself, in a format it does not read,
    or in a folder inside a class folder (hidden files and folders are skipped on purpose)."""
    suffixes = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
    problems = [
        f"{f} lies in the split folder itself; move it into {split_dir}/<class_name>/ or remove it"
        for f in sorted(split_dir.iterdir())
        if f.suffix.lower() in suffixes and not f.name.startswith(".") and f.is_file()
    ]
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.suffix.lower() in OTHER_IMAGE_EXTENSIONS and entry.is_file():
                problems.append(
                    f"{entry} is a {entry.suffix} file, a format selfprompt does not read "
                    f"({' '.join(IMAGE_EXTENSIONS)}); convert it (e.g. to PNG) or remove it"
                )
            elif entry.is_dir() and not entry.is_symlink() and _holds_images(entry, suffixes):
                problems.append(
                    f"{entry} is a folder of images inside a class folder, and only the images directly in a "
                    "class folder are read; move them up into the class folder or remove the folder"
                )
    if problems:
        more = f" ({len(problems)} such files or folders)" if len(problems) > 1 else ""
        raise ValueError(f"Images would be left out of split {split_dir}{more}: {problems[0]}.")


def _holds_images(folder: Path, suffixes: tuple[str, ...]) -> bool:
    for _, _, names in os.walk(folder):  # does not follow symbolic links (no loops)
        if any(name.lower().endswith(suffixes) and not name.startswith(".") for name in names):
            return True
    return False


def _list_samples(
    root: Path, split: str, classes: list[str] | None, option: str | None = None
) -> tuple[list[Sample], list[str]]:
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        found = sorted(p.stem for p in root.glob("*.txt") if p.name != "classes.txt")
        folders = "; it holds split folders, so pass --data.layout folder" if (root / split).is_dir() else ""
        raise FileNotFoundError(
            f"Split list {list_file} does not exist{folders}; split lists in {root}: "
            f"{', '.join(found) or 'none'}. {_pass_another(option)}, or write one "
            "'<relative/image/path> <label>' line per image."
        )
    parsed, bad = parse_list(list_file)
    if bad:
        more = f" ({len(bad)} such lines)" if len(bad) > 1 else ""
        raise ValueError(f"{list_file}:{bad[0].number}: {bad[0].problem}{more}; {bad[0].fix}.")
    entries = [(number, Path(os.path.normpath(root / path)), label) for number, path, label in parsed]
    if not entries:
        raise ValueError(
            f"Split list {list_file} is empty; add one '<relative/image/path> <label>' line per image."
        )

    classes_file = root / "classes.txt"
    if classes is not None:
        names, source = list(classes), "the classes given"
    elif classes_file.is_file():
        names, source = read_classes(classes_file), str(classes_file)
    else:
        names, source = _label_names(list_file, entries), "the labels"
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
            f"{list_file}:{number}: image {path} {_not_a_file(path)} ({len(missing)} listed images are "
            f"missing); paths are relative to {root}. Restore the files or fix the list."
        )
    return [(path, label) for _, path, label in entries], names


def _label_names(list_file: Path, entries: list[tuple[int, Path, int]]) -> list[str]:
    """``"0"`` .. ``str(max label)`` for a list without ``classes.txt``, whose labels must then all occur."""
    labels = {label for _, _, label in entries}
    top = max(labels)
    absent = sorted(set(range(top + 1)) - labels)
    if absent and top >= 0:
        number = next(number for number, _, label in entries if label == top)
        shown = ", ".join(map(str, absent[:_SHOWN])) + (
            f" and {len(absent) - _SHOWN} more" if len(absent) > _SHOWN else ""
        )
        raise ValueError(
            f"{list_file}:{number}: label {top} makes {top + 1} classes, but labels {shown} never occur in "
            f"{list_file.name} and there is no {list_file.parent / 'classes.txt'}. Fix the labels if they "
            f"are wrong; if the dataset really has {top + 1} classes, write classes.txt with one name per "
            "class (line k names label k)."
        )
    return [str(i) for i in range(top + 1)]


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not a readable file, as the end of a sentence that names it."""
    if path.is_symlink() and not path.exists():
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "is a folder, not an image file"
    if "\\" in path.name:
        return "does not exist (its path holds '\\': write '/' between folders, on every system)"
    return "does not exist"


@dataclass(frozen=True)
class BadLine:
    """A list file's line that cannot be used: its number, text, what is wrong with it and the fix."""

    number: int
    line: str
    problem: str
    fix: str


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped; ``\\n`` or ``\\r\\n`` ends).

    Raises:
        ValueError: The file is not UTF-8; names the file, the line and the byte, and how to re-save it.
    """
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        at = bom + error.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        encoding = "UTF-16" if utf16 else "in another encoding (Latin-1 or Windows-1252?)"
        raise ValueError(
            f"{path}:{line}:{column}: byte {at} (0x{data[at]:02x}) is not UTF-8: the file is {encoding}. "
            f"Re-save it as UTF-8 (e.g. iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8 '{path}' > "
            f"'{path}.utf8', then replace the file with it)."
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_classes(path: Path) -> list[str]:
    """The class names of a ``classes.txt``: one per non-blank line, stripped; line k names label k."""
    return [name.strip() for name in read_lines(path) if name.strip()]


def parse_list(list_file: Path) -> tuple[list[tuple[int, str, int]], list[BadLine]]:
    """A list file's ``(line number, relative path, label)`` entries and its bad lines (blank lines skipped).

    Paths are normalised (``./a/b`` is ``a/b``). A line is bad when it is not ``relative/path label`` (the
    label ASCII digits), its path is absolute, it names the same image as an earlier line, or its path leaves
    the list's base folder: the folder that holds the list, or the one that most of its lines reach with the
    same number of leading ``..`` (lists kept beside a read-only dataset, e.g. ``../images/a.jpg``), so
    that one stray ``../../..`` path cannot point anywhere.

    Raises:
        ValueError: The file is not UTF-8 (:func:`read_lines`).
    """
    entries: list[tuple[int, str, int]] = []
    bad: list[BadLine] = []
    usage = "each line must be '<relative/image/path> <integer label>'"
    first: dict[str, tuple[int, int]] = {}
    ups: dict[int, int] = {}  # entry index -> leading '..' of its path
    for number, line in enumerate(read_lines(list_file), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            bad.append(BadLine(number, line, f"cannot parse {line!r}: {usage}", "fix or remove the line"))
            continue
        raw, label = parts[0].strip(), int(parts[1])
        if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).drive or raw.startswith("\\"):
            bad.append(
                BadLine(
                    number,
                    line,
                    f"{raw!r} is an absolute path; paths are relative to {list_file.parent}",
                    "write it relative to that folder (then the dataset can move)",
                )
            )
            continue
        path = posixpath.normpath(raw)
        if path in first:
            earlier, earlier_label = first[path]
            labels = f" with labels {earlier_label} and {label}" if label != earlier_label else ""
            bad.append(
                BadLine(
                    number,
                    line,
                    f"{path} is listed twice in one split (also on line {earlier}){labels}",
                    "remove one of the lines",
                )
            )
            continue
        first[path] = (number, label)
        ups[len(entries)] = _leading_ups(path)
        entries.append((number, path, label))
    if entries:
        base = min(Counter(ups.values()).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
        base_dir = Path(os.path.normpath(list_file.parent.joinpath(*[".."] * base)))
        where = (
            "the list's folder"
            if base == 0
            else f"where this list's other images lie: their paths climb {base} folder(s) up"
        )
        for index, (number, path, _) in enumerate(entries):
            if ups[index] != base:
                bad.append(
                    BadLine(
                        number,
                        path,
                        f"{path} leaves {base_dir} ({where}) with '..'",
                        "fix the path, or move the image under that folder",
                    )
                )
        bad.sort(key=lambda b: b.number)
        escaped = {b.number for b in bad}
        entries = [entry for entry in entries if entry[0] not in escaped]
    return entries, bad


def _leading_ups(path: str) -> int:
    """How many ``..`` a normalised relative path starts with (it holds no others)."""
    parts = path.split("/")
    return next((i for i, part in enumerate(parts) if part != ".."), len(parts))


def _check_images(samples: list[Sample]) -> None:
    """Decode every image in full, as training will read it, and name the files that fail."""
    bad = [message for _, message in unreadable(path for path, _ in samples)]
    if bad:
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise ValueError(
            f"{len(bad)} image(s) cannot be read, so nothing is run: {' '.join(bad[:_SHOWN])}{more}"
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
