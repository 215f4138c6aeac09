"""Where a served, predicted or exported task comes from: an adapter folder or a run folder, read without
unpickling anything.

An adapter folder (``model.save_pretrained``) holds ``adapter.safetensors`` and ``adapter_config.json``,
which names its classes and preprocessing (adapters of earlier releases: ``classes.json`` beside it, and the
backbone's own preprocessing); a run folder (``selfprompt train``) holds one adapter per seed and stage and
the data settings its runs were made with. Only safetensors are read: a run's ``state.pt`` is never opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.adapter import CONFIG_NAME, WEIGHTS_NAME, TaskInfo, read_config
from selfprompt.data.config import DataConfig
from selfprompt.data.splits import preprocessing
from selfprompt.data.transforms import build_transform, data_config
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.trained import find_stage
from selfprompt.hub import adapter_folder

from torch import nn


@dataclass(frozen=True)
class AdapterSource:
    """One task's adapter and what it says of its task.

    Attributes:
        adapter: The adapter folder.
        classes: Its class names (``id2label``; None: ``class_<i>``).
        preprocessing: Its eval preprocessing (timm's data-config keys); None: its run's ``data`` settings
            (``data``), else the backbone's pretrained config.
        data: The run's data settings, for a run folder whose adapters predate ``preprocessing``.
        config: Its ``adapter_config.json``.
        run: The run folder it was found in, None for an adapter folder given directly.
    """

    adapter: Path
    classes: list[str] | None
    preprocessing: dict[str, Any] | None
    data: DataConfig | None
    config: dict
    run: Path | None = None

    def preprocessing_for(self, backbone: nn.Module) -> dict[str, Any]:
        """The preprocessing ``backbone`` gets for this task (see :attr:`preprocessing`)."""
        if self.preprocessing is not None:
            return self.preprocessing
        return preprocessing(self.data, backbone) if self.data is not None else data_config(backbone)

    def transform(self, backbone: nn.Module) -> Callable:
        """PIL image -> the tensor this task's model was evaluated on."""
        return build_transform(self.preprocessing_for(backbone), train=False)


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
        config = _checked_config(path)
        task = TaskInfo.from_config(config)
        classes = task.labels if task.labels is not None else _classes_beside(path)
        return AdapterSource(path, classes, task.preprocessing, None, config)
    run = RunDir(path)
    if not run.is_run():
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} (an adapter folder, written by model.save_pretrained) nor "
            f"config.yaml (a run folder, written by selfprompt train)."
        )
    found = find_stage(path, seed, stage, ema)
    config = _checked_config(found.adapter)
    task = TaskInfo.from_config(config)
    classes = task.labels
    if classes is None and found.folder.classes.is_file():
        classes = found.folder.read_classes()
    return AdapterSource(found.adapter, classes, task.preprocessing, found.config.data, config, path)


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
