"""From a run's config to the backbone and the model of its method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from selfprompt import backbones
from selfprompt.backbones import backbone_info
from selfprompt.config import ModelConfig, TrainConfig
from selfprompt.methods import Method, get_method, settings_sections
from selfprompt.model import ViTClassifier, backbone_pool

from torch import nn
from torch.utils.data import DataLoader


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """The configured backbone (see :func:`selfprompt.backbones.create_backbone`)."""
    return backbones.create_backbone(
        cfg.backbone,
        cfg.checkpoint,
        pretrained=cfg.pretrained,
        **dict(cfg.backbone_kwargs, drop_path_rate=cfg.drop_path),
    )


def backbone_name(backbone: nn.Module) -> str | None:
    """The name saved with adapters: the timm name, plus the weights file when one was given."""
    return backbone_info(backbone).adapter_name


def head_input(cfg: ModelConfig, backbone: nn.Module) -> str:
    """``model.pool``, else the weights family's (``mae`` for MAE), else the backbone's own pooling."""
    return cfg.pool or backbone_info(backbone).pool or backbone_pool(backbone)


def method_settings(cfg: TrainConfig) -> tuple[Method, Any]:
    """The configured method and its settings section; settings of sections it does not read must keep their
    defaults (a value set there would be silently ignored)."""
    method = get_method(cfg.model.method)
    for section in settings_sections().values():
        if section.name in method.sections:
            continue
        changed = [
            f.name
            for f in dataclasses.fields(section.cls)
            if getattr(getattr(cfg, section.name), f.name) != getattr(section.cls(), f.name)
        ]
        if changed:
            fields = ", ".join(f"{section.name}.{name}" for name in changed)
            raise ValueError(
                f"method {method.name!r} does not read the {section.name} settings; drop {fields}."
            )
    settings = method.settings_of(cfg)
    if method.has_prompts:
        method.initializer(getattr(settings, "init", None))  # refuses an initializer the method does not take
    return method, settings


def build_model(
    cfg: TrainConfig, backbone: nn.Module, num_classes: int, resolved: tuple[Method, Any] | None = None
) -> ViTClassifier:
    """The configured method's model around ``backbone`` (``resolved``: :func:`method_settings`'s answer,
    when the caller has it)."""
    method, settings = resolved or method_settings(cfg)
    return method.create(
        backbone,
        num_classes,
        settings,
        pool=head_input(cfg.model, backbone),
        head_init_std=cfg.model.head_init_std,
        backbone_name=backbone_name(backbone),
    )


def preparer(
    cfg: TrainConfig, resolved: tuple[Method, Any] | None = None
) -> Callable[[ViTClassifier, DataLoader, int], None] | None:
    """``prepare(model, loader, seed)`` of the configured method (its prompts' initialisation), or None."""
    method, settings = resolved or method_settings(cfg)
    if method.prepare is None:
        return None
    return lambda model, loader, seed: method.prepare(method, model, settings, loader, seed)
