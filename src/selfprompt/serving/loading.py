"""The backbone and the tasks a serving process (``selfprompt serve``, ``selfprompt export``) starts with."""

from __future__ import annotations

from pathlib import Path

from selfprompt.backbones import create_backbone
from selfprompt.engine.build import backbone_name
from selfprompt.engine.build import create_backbone as create_run_backbone
from selfprompt.methods import load_pretrained
from selfprompt.model import ViTClassifier
from selfprompt.serving.multitask import MultiTaskViT
from selfprompt.serving.sources import AdapterSource, resolve_source

from torch import nn


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` (or ``DIR``, named after its folder) -> {name: folder}; names must be unique."""
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR (or DIR), got {spec!r}.")
        if name in found:
            raise ValueError(f"Task name {name!r} is given twice (--adapter {spec}).")
        found[name] = Path(path).expanduser()
    if not found:
        raise ValueError("Give at least one adapter: --adapter NAME=DIR (an adapter folder or a run folder).")
    return found


def load_backbone(spec: str | None, first_source: Path) -> nn.Module:
    """The backbone named by ``spec`` (a timm name or a weights file), else the one ``first_source`` (an
    adapter or run folder) was trained on (:func:`source_backbone`)."""
    return source_backbone(spec, None if spec is not None else resolve_source(first_source))


def source_backbone(spec: str | None, source: AdapterSource | None) -> nn.Module:
    """The backbone named by ``spec`` (a timm name or a weights file), else the one ``source`` was trained
    on: its run's configured backbone, or the one its adapter records (timm name, creation arguments and
    whether its weights were pretrained or random; a weights file must be given)."""
    if spec is not None:
        return create_backbone(None, spec) if Path(spec).is_file() else create_backbone(spec)
    if source.run_config is not None:  # a run folder: its configured backbone
        return create_run_backbone(source.run_config.model)
    name = source.config["backbone"]["name"]
    if not name or "+" in name:
        raise ValueError(
            f"{source.adapter} was trained on {name}: pass --backbone NAME_OR_FILE (that weights file)."
            if name
            else f"{source.adapter} was trained on a hand-built backbone: pass --backbone NAME_OR_FILE."
        )
    weights = source.config.get("backbone_weights") or {}
    # random weights (pretrained false) are drawn under a fixed seed: the same ones again
    pretrained = weights.get("format") != "random"
    return create_backbone(name, pretrained=pretrained, **(weights.get("kwargs") or {}))


def load_source_model(
    path: str | Path,
    seed: int | None = None,
    stage: str | None = None,
    ema: bool = False,
    backbone: str | None = None,
    check_weights: bool = True,
) -> tuple[ViTClassifier, AdapterSource]:
    """The model of an adapter folder or of a run folder's ``seed``/``stage`` (:func:`resolve_source`) on the
    backbone ``backbone`` names (:func:`load_backbone`: default the one it was trained on), in eval mode on
    the CPU, with its :attr:`~selfprompt.model.ViTClassifier.task_info` complete: class names (``class_<i>``
    when none are recorded) and preprocessing."""
    source = resolve_source(path, seed, stage, ema)
    pristine = source_backbone(backbone, source)
    model = load_pretrained(source.adapter, pristine, backbone_name(pristine), check_weights)
    source.complete(model, pristine)
    return model.eval(), source


def load_multitask(
    adapters: dict[str, Path],
    backbone: str | None = None,
    stage: str | None = None,
    check_weights: bool = True,
) -> MultiTaskViT:
    """A :class:`MultiTaskViT` serving ``adapters`` ({name: adapter or run folder}); ``check_weights``:
    :meth:`MultiTaskViT.add_adapter`'s."""
    model = MultiTaskViT(load_backbone(backbone, next(iter(adapters.values()))))
    for name, path in adapters.items():
        model.add_adapter(name, path, stage=stage, check_weights=check_weights)
    return model
