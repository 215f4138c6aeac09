"""From a run's config to the backbone and the model of its method; :func:`get_model`, the same from Python
keywords."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from selfprompt import backbones
from selfprompt.backbones import backbone_info
from selfprompt.config import ModelConfig, TrainConfig
from selfprompt.init.registry import get_initializer
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
    return cfg.pool or backbone_pool(backbone)


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


def get_model(
    backbone: nn.Module,
    method: str,
    num_classes: int,
    *,
    pool: str | None = None,
    head_init_std: float = 0.02,
    backbone_name: str | None = None,
    init_data: Iterable[Any] | None = None,
    seed: int = 0,
    **settings: Any,
) -> ViTClassifier:
    """Any registered method's model around ``backbone``, as ``selfprompt train`` builds it.

    ``settings`` are the method's settings by field name (``rank=4`` for lora, ``num_prompts=10`` or
    ``init="kmeans"`` for the prompt methods) or a whole section by its name (``prompt={"num_prompts": 10}``,
    ``vfpt=VFPTSettings(...)``); what is not given takes the CLI's defaults (``spt-deep``: 20 prompts), and
    every value is checked as the CLI checks it. ``pool`` None is the CLI's head input for this backbone
    (``mae`` for MAE weights). With ``init_data`` (batches of images, or (images, labels) as a DataLoader
    gives) the method prepares the model from it, e.g. SPT's prompts from the images' patch tokens (``seed``:
    its draws); a method whose initializer needs the images and gets none keeps random prompts, with a
    warning naming the fix.
    """
    resolved = get_method(method)
    cfg = TrainConfig()
    cfg.model.method, cfg.model.pool, cfg.model.head_init_std = method, pool, head_init_std
    _set_settings(cfg, resolved, settings)
    problems = []
    for name in resolved.sections:
        problems += [f"{name}.{problem}" for problem in getattr(cfg, name).problems()]
    if problems:
        raise ValueError(f"get_model({method!r}): " + "; ".join(problems) + ".")
    resolved, chosen = method_settings(cfg)
    model = resolved.create(
        backbone,
        num_classes,
        chosen,
        pool=head_input(cfg.model, backbone),
        head_init_std=head_init_std,
        backbone_name=backbone_info(backbone).adapter_name if backbone_name is None else backbone_name,
    )
    init = resolved.initializer(getattr(chosen, "init", None)) if resolved.has_prompts else None
    if init_data is not None and resolved.prepare is not None:
        resolved.prepare(resolved, model, chosen, init_data, seed)
    elif init is not None and get_initializer(init).needs_tokens:
        warnings.warn(
            f"{method}'s prompts are built from the training images ({init!r}); without init_data they stay "
            f"random: pass init_data=loader, or call selfprompt.init_prompts(model, loader, {init!r}).",
            UserWarning,
            stacklevel=2,
        )
    return model


def _set_settings(cfg: TrainConfig, method: Method, settings: dict[str, Any]) -> None:
    """Put each keyword into the method's section that has that field (or a whole section by its name)."""
    sections = {name: getattr(cfg, name) for name in method.sections}
    for key, value in settings.items():
        if key in sections:
            fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
            for name, item in fields.items():
                _set_field(method, key, sections[key], name, item)
            continue
        owners = [name for name, section in sections.items() if key in _field_names(section)]
        if len(owners) != 1:
            known = {name: sorted(_field_names(section)) for name, section in sections.items()}
            why = f"is in {' and '.join(owners)}: pass it as {owners[0]}={{...}}" if owners else "is unknown"
            raise TypeError(
                f"get_model({method.name!r}): setting {key!r} {why}; its settings: {known or 'none'}."
            )
        _set_field(method, owners[0], sections[owners[0]], key, value)


def _field_names(section: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(section)}


def _set_field(method: Method, section_name: str, section: Any, name: str, value: Any) -> None:
    if name not in _field_names(section):
        raise TypeError(
            f"get_model({method.name!r}): {section_name} has no setting {name!r}; it has "
            f"{sorted(_field_names(section))}."
        )
    setattr(section, name, value)
