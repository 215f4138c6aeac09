"""The backbone and the tasks a serving process (``selfprompt serve``, ``selfprompt export``) starts with."""

from __future__ import annotations

from pathlib import Path

from selfprompt.adapter import read_config
from selfprompt.backbones import create_backbone
from selfprompt.engine.build import create_backbone as create_run_backbone
from selfprompt.engine.trained import load_run_config
from selfprompt.serving.multitask import MultiTaskViT
from selfprompt.serving.sources import resolve_source

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
    """The backbone named by ``spec`` (a timm name or a weights file), else the one ``first_source`` was
    trained on: its run's configured backbone, or the timm name its adapter recorded."""
    if spec is not None:
        return create_backbone(None, spec) if Path(spec).is_file() else create_backbone(spec)
    source = resolve_source(first_source)
    if source.data is not None:  # a run folder: its configured backbone
        return create_run_backbone(load_run_config(first_source).model)
    name = read_config(source.adapter)["backbone"]["name"]
    if not name or "+" in name:
        raise ValueError(
            f"{source.adapter} was trained on {name}: pass --backbone NAME_OR_FILE."
            if name
            else f"{source.adapter} was trained on a hand-built backbone: pass --backbone NAME_OR_FILE."
        )
    return create_backbone(name)


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
