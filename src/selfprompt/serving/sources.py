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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selfprompt.adapter import CONFIG_NAME, WEIGHTS_NAME, TaskInfo, read_config
from selfprompt.config import TrainConfig
from selfprompt.data.splits import preprocessing
from selfprompt.data.transforms import build_transform, data_config
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.trained import find_stage
from selfprompt.hub import adapter_folder
from selfprompt.model import ViTClassifier

from torch import nn


@dataclass(frozen=True)
class AdapterSource:
    """One task's adapter and what it says of its task.

    Attributes:
        adapter: The adapter folder.
        classes: Its class names (``id2label``; None: ``class_<i>``).
        preprocessing: Its eval preprocessing (timm's data-config keys); None: its run's ``data`` settings,
            else the backbone's pretrained config.
        config: Its ``adapter_config.json``.
        run: The run folder it was found in, None for an adapter folder given directly.
        run_config: That run's resolved config (its backbone and, for adapters that predate
            ``preprocessing``, its data settings).
    """

    adapter: Path
    classes: list[str] | None
    preprocessing: dict[str, Any] | None
    config: dict
    run: Path | None = None
    run_config: TrainConfig | None = None

    def preprocessing_for(self, backbone: nn.Module) -> dict[str, Any]:
        """The preprocessing ``backbone`` gets for this task (see :attr:`preprocessing`)."""
        if self.preprocessing is not None:
            return self.preprocessing
        if self.run_config is not None:
            return preprocessing(self.run_config.data, backbone)
        return data_config(backbone)

    def transform(self, backbone: nn.Module) -> Callable:
        """PIL image -> the tensor this task's model was evaluated on."""
        return build_transform(self.preprocessing_for(backbone), train=False)

    def complete(self, model: ViTClassifier, backbone: nn.Module) -> list[str]:
        """Give ``model`` (loaded from this adapter onto ``backbone``) this task's class names (``class_<i>``
        when none are recorded), checked against its head, and preprocessing; returns the names."""
        num_classes = model.config.num_classes
        classes = list(self.classes or [f"class_{i}" for i in range(num_classes)])
        task = replace(model.task_info, labels=classes, preprocessing=self.preprocessing_for(backbone))
        task.check(num_classes, f"{self.adapter} (its id2label, or the classes.json beside it)")
        model.task_info = task
        return classes


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
        adapter, run, run_config, folder = path, None, None, None
    elif RunDir(path).is_run():
        found = find_stage(path, seed, stage, ema)
        adapter, run, run_config, folder = found.adapter, path, found.config, found.folder
    else:
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} (an adapter folder, written by model.save_pretrained) nor "
            f"config.yaml (a run folder, written by selfprompt train)."
        )
    config = _checked_config(adapter)
    task = TaskInfo.from_config(config)
    classes = task.labels
    if classes is None:  # adapters of earlier releases: classes.json beside them
        if folder is None:
            classes = _classes_beside(adapter)
        elif folder.classes.is_file():
            classes = folder.read_classes()
    return AdapterSource(adapter, classes, task.preprocessing, config, run, run_config)


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
