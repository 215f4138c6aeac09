"""Manifests of prepared benchmark folders: what they record, and the hashes checks recompute."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"


def split_hash(folder: Path, list_text: str) -> str:
    """SHA-256 of a list file and of every image it names, in order (what a manifest of one hash per split,
    the older layout, holds)."""
    digest = hashlib.sha256(list_text.encode())
    for line in list_text.splitlines():
        digest.update((folder / line.rsplit(" ", 1)[0]).read_bytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of one file's bytes (a list file, an image)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish_task(
    staging: Path,
    final: Path,
    lists: dict[str, list[tuple[str, int]]],
    num_classes: int,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write each split's list file into ``staging``, record in ``manifest`` its count, class counts,
    :func:`split_hash`, the list file's own hash and each image's (under ``counts``, ``class_counts``,
    ``sha256``, ``list_sha256``, ``file_sha256``: ``selfprompt data check`` names each file that changed),
    write the manifest, then rename ``staging`` to ``final``, replacing it: a task folder is complete or
    absent. Returns the manifest."""
    for key in ("counts", "class_counts", "sha256", "list_sha256"):
        manifest.setdefault(key, {})
    for split, entries in lists.items():
        text = "".join(f"{path} {label}\n" for path, label in entries)
        (staging / f"{split}.txt").write_text(text)
        labels = [label for _, label in entries]
        manifest["counts"][split] = len(entries)
        manifest["class_counts"][split] = np.bincount(labels, minlength=num_classes).tolist()
        manifest["sha256"][split] = split_hash(staging, text)
        manifest["list_sha256"][split] = file_hash(staging / f"{split}.txt")
    images = sorted({path for entries in lists.values() for path, _ in entries})
    manifest["file_sha256"] = {path: file_hash(staging / path) for path in images}
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return manifest
