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
        curves.png, curves.plot.json  train loss, accuracy and lr per epoch, and the numbers drawn
        confusion_<split>.png, .plot.json, .csv  ``selfprompt eval --plot``: confusion, per-class accuracy
        adapter/, adapter_ema/        the trained adapter (and its EMA)
    <run>/encoder.safetensors         ``selfprompt pretrain``: the pretrained encoder (the run is its own
                                      TrainingDir: metrics and state.pt sit in <run>/)
    <run>/diverged.json               the error of a run stopped by a non-finite loss (a new start replaces
                                      such a run)
    <run>/.lock                       held (POSIX ``lockf``) by the process training in it, with its PID
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.atomic import TEMPORARY, read_json, write_json, write_text
from selfprompt.engine.result import StageResult
from selfprompt.safe_yaml import load_yaml

import yaml

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]


class RunInUseError(RuntimeError):
    """Another process holds the run folder's lock."""


_HELD: set[Path] = set()  # lock files this process holds
_IN_USE_FIX = "wait for it to finish or stop it, or pick another --output_dir."


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

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    def confusion(self, split: str) -> Path:
        return self.path / f"confusion_{split}.png"

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

    def read_result(self) -> StageResult:
        fix = "delete it and resume (--resume true) to finish the stage again"
        record = read_json(self.result, fix)
        try:
            return StageResult.from_json(record)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{self.result} is not a stage result ({error!r} is wrong or missing); {fix}."
            ) from None

    def write_result(self, result: StageResult) -> None:
        write_json(self.result, result.to_json())

    def read_rows(self, name: str = METRICS) -> list[dict[str, Any]]:
        path = self.log_file(name, "jsonl")
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not valid JSON ({error}): the file is damaged."
                ) from None
        return rows

    def read_classes(self) -> list[str]:
        """The class names, index by index; an error names the file when it is not a list of names."""
        classes = read_json(self.classes, "restore it: a list of the class names in label order")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(
                f"{self.classes} must hold a JSON list of class names (strings) in label order; restore it."
            )
        return classes

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

    @property
    def diverged(self) -> Path:
        return self.path / "diverged.json"

    def write_diverged(self, error: str) -> None:
        write_json(self.diverged, {"error": error})

    def clear_training(self) -> None:
        """Remove what training wrote (stages, checkpoints, logs, results, the encoder), keeping the config,
        the lock and any file of the user's: a new start replaces a run stopped by a non-finite loss."""
        logs = [self.log_file(n, s) for n in (self.METRICS, self.ANALYSIS) for s in ("jsonl", "csv")]
        files = [self.summary, self.env, self.encoder, self.diverged, self.state, self.result, self.classes]
        for path in [*files, *logs, *self.projections().values()]:
            path.unlink(missing_ok=True)
        stages = [p for p in self.path.glob("seed*") if re.fullmatch(r"seed\d+", p.name)]
        for folder in [self.tensorboard, self.adapter(), self.adapter(ema=True), *stages]:
            shutil.rmtree(folder, ignore_errors=True)

    def stage(self, seed: int, name: str) -> TrainingDir:
        return TrainingDir(self.path / f"seed{seed}" / name)

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def is_run(self) -> bool:
        return self.config.is_file()

    def has_progress(self) -> bool:
        """Whether training got anywhere: a checkpoint, a finished stage, a summary or an encoder. A folder
        with a config and none of these never finished its first epoch: a new start may replace it."""
        if self.summary.is_file() or self.encoder.is_file() or self.state.is_file():
            return True
        return any(True for name in ("state.pt", "result.json") for _ in self.path.glob(f"seed*/*/{name}"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (creating the folder) while the block runs; another process that asks
        meanwhile gets :class:`RunInUseError`. The OS drops the lock when its process ends, even killed, so
        a lock left by a dead process is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        key = self.lock_file.resolve()
        if key in _HELD:  # POSIX locks are per process: this process's own second claim is refused here
            raise RunInUseError(f"{self.path} is in use by this process (PID {os.getpid()}); {_IN_USE_FIX}")
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:  # a POSIX lock: forked children (loader workers) do not inherit it, unlike flock's
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunInUseError(
                    f"{self.path} is in use by another selfprompt process (PID {holder}); {_IN_USE_FIX}"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)

    def remove_temporary_files(self) -> list[Path]:
        """Delete the temporary files of atomic writes that a killed process left (call under the lock)."""
        pattern = re.compile(TEMPORARY)
        removed = []
        for path in self.path.rglob(".*.tmp"):
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def read_config(self) -> dict[str, Any]:
        """The saved config as plain data; an error names the folder when it holds no run, and the file
        when it is not a mapping of config sections."""
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.config} does not exist: {self.path} is not a run directory written by "
                f"`selfprompt train` or `selfprompt pretrain`."
            )
        data = load_yaml(self.config.read_text(), str(self.config))
        if not isinstance(data, dict):
            raise ValueError(
                f"{self.config} must hold a mapping of config sections, got {type(data).__name__}; restore "
                f"it from a backup, or start the run afresh in another --output_dir."
            )
        return data

    def write_config(self, data: dict[str, Any]) -> None:
        write_text(self.config, yaml.safe_dump(data, sort_keys=False))

    def read_env(self) -> dict[str, Any]:
        return read_json(self.env)

    def write_env(self, env: dict[str, Any]) -> None:
        write_json(self.env, env)

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary)

    def read_results(self) -> list[StageResult]:
        """Every finished stage ``summary.json`` records, in the order they ran."""
        return [StageResult.from_json(record) for record in self.read_summary()["results"]]

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)
