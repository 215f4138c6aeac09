"""Adapter checkpoints: prompts + head as safetensors, the config as JSON, both written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from selfprompt.model import backbone_signature, timm_name
from selfprompt.version import __version__

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

if TYPE_CHECKING:
    from selfprompt.model import ViTClassifier

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: ViTClassifier, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_parameters().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "class": type(model).__name__,
        "model": asdict(model.config),
        "backbone": backbone_signature(model.backbone, model.backbone_name),
        "backbone_weights": _weights_record(model.backbone),
        "versions": {"selfprompt": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _weights_record(backbone: nn.Module) -> dict:
    """The origin and licence of the backbone's weights (informative; not checked on load)."""
    from selfprompt.backbones import backbone_info

    info = backbone_info(backbone)
    checkpoint = Path(info.checkpoint).name if info.checkpoint else None
    return {"license": info.license, "family": info.family, "format": info.format, "checkpoint": checkpoint}


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: not a selfprompt adapter directory "
            f"(write one with PromptedViT.save_pretrained)."
        )
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format {config.get('format_version')!r}; this selfprompt "
            f"({__version__}) reads format {FORMAT_VERSION}."
        )
    return config


def _check_backbone(saved: dict, backbone: nn.Module, name: str | None, directory: Path) -> None:
    if not isinstance(backbone, VisionTransformer):
        return  # PromptedViT's constructor names what is supported
    actual = backbone_signature(backbone, name if name is not None else timm_name(backbone))
    problems = [
        f"{key}: the adapter was trained with {saved[key]!r}, this backbone has {actual[key]!r}"
        for key in saved
        if saved[key] != actual.get(key)
    ]
    if problems:
        hint = (
            "\n(a hand-built or renamed backbone: pass backbone_name=...)"
            if saved["name"] != actual["name"]
            else ""
        )
        raise ValueError(
            f"The backbone does not match the adapter in {directory}:\n  " + "\n  ".join(problems) + hint
        )


def load_adapter(
    directory: str | Path,
    backbone: nn.Module,
    backbone_name: str | None = None,
    expected: type[ViTClassifier] | None = None,
) -> ViTClassifier:
    """Rebuild the model saved in ``directory`` on ``backbone`` (a ViTClassifier or a PromptedViT).

    ``expected`` (set by ``from_pretrained``) refuses a directory that holds another kind of model.
    """
    from selfprompt.model import PromptedViT, ViTClassifier

    directory = Path(directory)
    config = _read_config(directory)
    cls = {c.__name__: c for c in (ViTClassifier, PromptedViT)}[config["class"]]
    if expected is not None and cls is not expected:
        raise ValueError(
            f"{directory} holds a {cls.__name__}, not a {expected.__name__}: load it with "
            f"selfprompt.{cls.__name__}.from_pretrained or selfprompt.load_pretrained."
        )
    _check_backbone(config["backbone"], backbone, backbone_name, directory)
    model = cls(backbone, backbone_name=backbone_name, **config["model"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the adapter directory is incomplete.")
    tensors = load_file(str(weights))
    params = model.adapter_parameters()
    if set(tensors) != set(params):
        raise ValueError(f"{weights} holds tensors {sorted(tensors)}, expected {sorted(params)}.")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{weights}: {key} has shape {tuple(tensors[key].shape)}, the config implies "
                    f"{tuple(param.shape)}."
                )
            param.copy_(tensors[key])
    return model
