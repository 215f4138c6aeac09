"""selfprompt's offline model zoo: small ViTs pretrained by ``selfprompt pretrain``, shipped as fp16
safetensors with a model card each, loaded by name through timm (see :mod:`selfprompt.zoo.models`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from selfprompt.zoo.models import WEIGHTS_DIR, ZOO_TAGS

REGISTRY_NAME = "registry.json"


def registry(weights_dir: Path = WEIGHTS_DIR) -> dict[str, dict[str, Any]]:
    """Name -> ``{file, sha256, bytes, parameters, dtype}`` of every exported backbone."""
    path = weights_dir / REGISTRY_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def available() -> list[str]:
    """The zoo names whose weights ship with this installation."""
    return [name for name in registry() if weights_file(name).is_file()]


def weights_file(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    if name not in ZOO_TAGS:
        raise ValueError(f"{name!r} is not in selfprompt's zoo; its names: {list(ZOO_TAGS)}.")
    return weights_dir / f"{name}.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(name: str, weights_dir: Path = WEIGHTS_DIR) -> None:
    """Raise if ``name``'s shipped weights are missing or differ from their recorded SHA-256."""
    entry = registry(weights_dir).get(name)
    path = weights_file(name, weights_dir)
    if entry is None or not path.is_file():
        raise FileNotFoundError(
            f"The weights of {name} are not in {weights_dir}; reinstall selfprompt, or export them with "
            f"`selfprompt zoo export RUN_DIR --name {name}`."
        )
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise ValueError(
            f"{path} has SHA-256 {actual}, its registry records {entry['sha256']}: the file is damaged or "
            f"was replaced; reinstall selfprompt."
        )
