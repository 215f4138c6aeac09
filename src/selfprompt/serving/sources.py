"""Where a served task comes from: an adapter folder or a run folder, read without unpickling anything.

An adapter folder (``model.save_pretrained``) holds ``adapter.safetensors`` and ``adapter_config.json``; a
run folder (``selfprompt train``) holds one adapter per seed and stage, its class names and the data
settings its eval transform is built from. Only safetensors are read: a run's ``state.pt`` is never opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfprompt.adapter import CONFIG_NAME, WEIGHTS_NAME, read_config
from selfprompt.data.config import DataConfig
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.trained import find_stage
from selfprompt.hub import adapter_folder


@dataclass(frozen=True)
class AdapterSource:
    """One task's adapter, its class names (None: ``class_<i>``) and its run's data settings (None: the
    backbone's pretrained preprocessing)."""

    adapter: Path
    classes: list[str] | None
    data: DataConfig | None
    config: dict


def resolve_source(
    path: str | Path,
    seed: int | None = None,
    stage: str | None = None,
    ema: bool = False,
    revision: str | None = None,
) -> AdapterSource:
    """The adapter of ``path``: an adapter folder, or a run folder's ``seed``/``stage`` adapter
    (:func:`selfprompt.engine.trained.find_stage`: default the first seed, ``final`` if it finished, else
    ``tune``), or a Hub repo id, ``org/name[@revision]`` (:func:`selfprompt.hub.adapter_folder`)."""
    path = adapter_folder(Path(path).expanduser(), revision)  # a Hub repo id: its snapshot in the Hub cache
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass an adapter folder or a run folder.")
    if (path / CONFIG_NAME).is_file():
        return AdapterSource(path, _classes_beside(path), None, _checked_config(path))
    run = RunDir(path)
    if not run.is_run():
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} (an adapter folder, written by model.save_pretrained) nor "
            f"config.yaml (a run folder, written by selfprompt train)."
        )
    found = find_stage(path, seed, stage, ema)
    classes = found.folder.read_classes() if found.folder.classes.is_file() else None
    return AdapterSource(found.adapter, classes, found.config.data, _checked_config(found.adapter))


def _checked_config(adapter: Path) -> dict:
    config = read_config(adapter)
    if not (adapter / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{adapter / WEIGHTS_NAME} is missing: the adapter folder is incomplete.")
    return config


def _classes_beside(adapter: Path) -> list[str] | None:
    """``classes.json`` in the adapter folder or beside it (a run's stage folder)."""
    for candidate in (adapter / "classes.json", TrainingDir(adapter.parent).classes):
        if candidate.is_file():
            classes = json.loads(candidate.read_text())
            if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
                return classes
    return None
