"""Atomic file writing: a temporary file beside the target, then a rename over it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMPORARY = r"\..+\.\d+\.tmp"  # the name of a temporary file: .<name>.<pid>.tmp
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20  # bytes left under which a failed write is put down to a full disk


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; ``str()`` is the whole message."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def disk_full_error(path: str | os.PathLike, error: BaseException) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``error`` (an OSError, or torch's RuntimeError for a
    failed write) came from a full disk; else None. Its message is one sentence: the path and the fix,
    without the cause's own text (torch's writer internals, the temporary file's name)."""
    if isinstance(error, DiskFullError):
        return error
    full = isinstance(error, OSError) and error.errno in DISK_FULL
    if not full and isinstance(error, (OSError, RuntimeError)):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(Path(path).parent).free < LOW_SPACE
    if not full:
        return None
    return DiskFullError(
        errno.ENOSPC,
        f"The disk is full: cannot write {path}; free space on that disk, then run the command again (a "
        f"training run continues where it stopped with --resume true).",
        str(path),
    )


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    Raises:
        DiskFullError: The disk is full; the message names ``path``. ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        full = disk_full_error(path, error)
        if full is None:
            raise
        raise full from error
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON with a final newline."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, fix: str = "restore it, or delete it and resume to write it again") -> Any:
    """The JSON in ``path``; a damaged file is a ValueError naming it and ``fix``."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged; {fix}.") from None
