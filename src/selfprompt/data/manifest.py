"""Hashes that prepared benchmark folders record in their manifests and checks recompute."""

from __future__ import annotations

import hashlib
from pathlib import Path


def split_hash(folder: Path, list_text: str) -> str:
    """SHA-256 of a list file and of every image it names, in order."""
    digest = hashlib.sha256(list_text.encode())
    for line in list_text.splitlines():
        digest.update((folder / line.rsplit(" ", 1)[0]).read_bytes())
    return digest.hexdigest()
