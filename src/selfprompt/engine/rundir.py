"""The run folder's layout, in one place: every other module asks these objects for paths.

::

    <run>/config.yaml                 the resolved config (``selfprompt train`` and ``pretrain``)
    <run>/env.json                    versions, command, device, data fingerprints, backbone record
    <run>/summary.json                results of every seed and stage, mean and std
    <run>/seed<N>/<stage>/            one training stage (``tune``, ``final``), a :class:`TrainingDir`:
        metrics.jsonl, metrics.csv    one row per epoch (tensorboard/ with --tensorboard true)
        analysis.jsonl, analysis.csv  tracked prompt statistics (--track.every N)
        projection_epoch<E>.safetensors
        state.pt                      the resumable training state
        result.json, classes.json     the stage's result and class names
        adapter/, adapter_ema/        the trained adapter (and its EMA)
    <run>/encoder.safetensors         ``selfprompt pretrain``: the pretrained encoder (the run is its own
                                      TrainingDir: metrics and state.pt sit in <run>/)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.atomic import write_json, write_text

import yaml


@dataclass(frozen=True)
class TrainingDir:
    """Where one epoch loop writes: metrics, analysis, training state, result and the trained adapter."""

    path: Path

    METRICS = "metrics"
    ANALYSIS = "analysis"

    @property
    def state(self) -> Path:
        return self.path / "state.pt"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def classes(self) -> Path:
        return self.path / "classes.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def log_file(self, name: str, suffix: str) -> Path:
        """``<name>.<suffix>`` for a metrics-like log (``metrics``, ``analysis``; ``jsonl``, ``csv``)."""
        return self.path / f"{name}.{suffix}"

    def adapter(self, ema: bool = False) -> Path:
        return self.path / ("adapter_ema" if ema else "adapter")

    def projection(self, epoch: int) -> Path:
        return self.path / f"projection_epoch{epoch}.safetensors"

    def projections(self) -> dict[int, Path]:
        """The saved projection files by epoch."""
        prefix = "projection_epoch"
        return {int(p.stem[len(prefix) :]): p for p in self.path.glob(f"{prefix}*.safetensors")}

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result.read_text())

    def write_result(self, result: dict[str, Any]) -> None:
        write_json(self.result, result)

    def read_rows(self, name: str = METRICS) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file(name, "jsonl").read_text().splitlines()]

    def read_classes(self) -> list[str]:
        return json.loads(self.classes.read_text())

    def write_classes(self, classes: list[str]) -> None:
        write_text(self.classes, json.dumps(classes))


@dataclass(frozen=True)
class RunDir(TrainingDir):
    """A run folder written by ``selfprompt train`` or ``selfprompt pretrain``."""

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def encoder(self) -> Path:
        return self.path / "encoder.safetensors"

    def stage(self, seed: int, name: str) -> TrainingDir:
        return TrainingDir(self.path / f"seed{seed}" / name)

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        """The saved config as plain data; an error names the folder when it holds no run."""
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.config} does not exist: {self.path} is not a run directory written by "
                f"`selfprompt train` or `selfprompt pretrain`."
            )
        return yaml.safe_load(self.config.read_text())

    def write_config(self, data: dict[str, Any]) -> None:
        write_text(self.config, yaml.safe_dump(data, sort_keys=False))

    def read_env(self) -> dict[str, Any]:
        return json.loads(self.env.read_text())

    def write_env(self, env: dict[str, Any]) -> None:
        write_json(self.env, env)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)
