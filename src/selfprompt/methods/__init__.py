"""PETL methods, one module per family, and their registry (:mod:`selfprompt.methods.registry`).

Every module of this package is imported here, so a method's module registers it and nothing else needs an
edit: adding a method is its module plus its recipes (``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from selfprompt.adapter import read_config
from selfprompt.hub import adapter_folder
from selfprompt.methods.registry import (
    Method,
    Settings,
    applicable_methods,
    get_method,
    method_names,
    model_classes,
    register_method,
    register_settings,
    settings_sections,
    stage_commands,
)
from selfprompt.model import ViTClassifier

from torch import nn

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")


def load_pretrained(
    directory: str | Path,
    backbone: nn.Module,
    backbone_name: str | None = None,
    check_weights: bool = True,
    *,
    revision: str | None = None,
) -> ViTClassifier:
    """Rebuild the model saved in ``directory`` (by any method's ``save_pretrained``; or a Hub repo id,
    ``org/name``, at ``revision``) on ``backbone`` (``check_weights``:
    :meth:`ViTClassifier.from_pretrained`)."""
    directory = adapter_folder(directory, revision)
    name = read_config(directory)["class"]
    classes = model_classes()
    if name not in classes:
        raise ValueError(
            f"{directory} holds a {name!r} adapter, which no registered method builds "
            f"(known: {', '.join(sorted(classes))})."
        )
    return classes[name].from_pretrained(directory, backbone, backbone_name, check_weights)


__all__ = [
    "Method",
    "Settings",
    "applicable_methods",
    "get_method",
    "load_pretrained",
    "method_names",
    "model_classes",
    "register_method",
    "register_settings",
    "settings_sections",
    "stage_commands",
]
