"""One way to read an image file as the 8-bit RGB picture a person sees, and one way to say why it failed.

:func:`load_rgb` is what training, evaluation and prediction read images with; :func:`unreadable` is the
up-front check before a run (it decodes every file with :func:`load_rgb`, so a file that passes it is one
training can read).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# what PIL raises for a missing, unidentifiable, truncated, malformed or oversized file
READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
# integer modes PIL gives 16-bit grayscale files (PNG, TIFF, PGM): values 0..65535
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# files that decoded in this process, as (path, size, mtime_ns): a split's images are not decoded again
# for the next split that lists them (train + val, then train+val), unless the file changed
_DECODED: set[tuple[str, int, int]] = set()
_DECODED_MAX = 1_000_000


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``, of any PIL mode.

    16-bit grayscale (``I;16*``, and ``I``, which PIL uses for 16-bit PNG and PGM files) is scaled to 8 bits
    (``round(v / 257)``: 65535 is white, 32768 mid-grey); PIL's own conversion clips it at 255 instead, so
    that anything above 0.4% brightness turns white. 16-bit RGB files already open as 8-bit ``RGB`` (PIL
    keeps each sample's high byte). CMYK uses PIL's conversion, ``R = (255 - C) * (255 - K) / 255`` (no ICC
    colour management). Palette, grayscale, ``LA`` and ``RGBA`` images use PIL's conversion (alpha dropped).
    ``F`` (32-bit float) keeps PIL's reading of values as 0..255.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same colours, without PIL's warning about palette transparency
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path``, decoded in full, turned upright by its EXIF orientation, as 8-bit RGB.

    Raises:
        ValueError: The file cannot be read as an image (missing, not readable, empty, not an image,
            truncated, too large); the message names the file, the cause and the fix.
    """
    try:
        with Image.open(path) as image:
            ImageOps.exif_transpose(image, in_place=True)  # decodes the whole file
            return to_rgb(image)
    except READ_ERRORS as error:
        raise ValueError(read_error_message(path, error)) from error


def read_error_message(path: str | os.PathLike, error: BaseException) -> str:
    """``Cannot read image PATH: what is wrong; the fix.`` for an error PIL or the OS raised reading it."""
    path = Path(path)
    if isinstance(error, FileNotFoundError):
        if path.is_symlink():
            cause, fix = f"it is a broken symbolic link (to {os.readlink(path)})", "restore its target"
        else:
            cause, fix = "it does not exist", "restore the file or remove it from the split"
    elif isinstance(error, IsADirectoryError):
        cause, fix = "it is a folder", "rename the folder or remove it from the split"
    elif isinstance(error, PermissionError):
        cause, fix = "permission denied", f"make it readable (chmod a+r '{path}')"
    elif isinstance(error, Image.DecompressionBombError):
        cause, fix = f"{error}", "downscale it"
    elif path.is_file() and path.stat().st_size == 0:
        cause, fix = "the file is empty (0 bytes)", "remove or replace the file"
    elif isinstance(error, UnidentifiedImageError):
        cause, fix = "it is not an image file PIL can read", "remove or replace the file"
    elif "truncated" in str(error).lower():
        cause, fix = f"the file is cut short ({error})", "re-download it, or remove or replace the file"
    else:
        cause, fix = f"{type(error).__name__}: {error}", "remove or replace the file"
    return f"Cannot read image {path}: {cause}; {fix}."


def _read_problem(path: Path) -> str | None:
    try:
        stat = path.stat()
        key: tuple[str, int, int] | None = (str(path), stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError):
        key = None
    if key in _DECODED:
        return None
    try:
        load_rgb(path)
    except ValueError as error:
        return str(error)
    if key is not None:
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED.add(key)
    return None


def unreadable(paths: Iterable[str | os.PathLike], threads: int | None = None) -> list[tuple[Path, str]]:
    """Decode every image in full with :func:`load_rgb` and return ``(path, message)`` for each that fails,
    in input order.

    Files are decoded on ``threads`` threads (default: the CPUs this process may use, at most 8); PIL
    releases the GIL while it decodes, so threads scale with cores on larger images. A file that decoded
    before in this process is skipped while its size and modification time stay the same.
    """
    unique: Sequence[Path] = list(dict.fromkeys(Path(p) for p in paths))
    if threads is None:
        threads = min(
            8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    if threads <= 1 or len(unique) < 2 * threads:
        problems = [_read_problem(p) for p in unique]
    else:
        with ThreadPoolExecutor(threads) as pool:
            problems = list(pool.map(_read_problem, unique))
    return [(path, problem) for path, problem in zip(unique, problems, strict=True) if problem is not None]
