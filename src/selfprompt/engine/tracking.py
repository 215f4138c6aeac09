"""Prompt/patch-token statistics during training: a fixed probe batch, one row per tracked epoch."""

from __future__ import annotations

import time
from typing import Any

from selfprompt.analysis.statistics import STATISTICS, BlockInput, block_inputs, layer_statistics
from selfprompt.atomic import atomic_write
from selfprompt.config import TrackConfig
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.rundir import TrainingDir
from selfprompt.methods import Method
from selfprompt.model import ViTClassifier

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset


def check_track(track: TrackConfig, method: Method) -> None:
    """Refuse tracking for a method without prompts, before anything runs (the fields' ranges are
    :func:`~selfprompt.config.check_config`'s)."""
    if track.every and not method.has_prompts:
        raise ValueError(f"track.every needs prompts and method {method.name!r} has none; set track.every 0.")


def probe_batch(dataset: Dataset, count: int, seed: int) -> torch.Tensor:
    """``count`` images (all if fewer) of ``dataset``, drawn with ``seed`` and stacked in index order."""
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[i][0] for i in chosen.sort().values.tolist()])


def flat_row(epoch: int, statistics: list[dict[str, float]]) -> dict[str, Any]:
    """``{"epoch": epoch, "<statistic>/layer<l>": value, ...}``."""
    row: dict[str, Any] = {"epoch": epoch}
    for name in STATISTICS:
        row |= {f"{name}/layer{layer}": stats[name] for layer, stats in enumerate(statistics)}
    return row


class PromptTracker:
    """Records :func:`~selfprompt.analysis.statistics.layer_statistics` of every block on a fixed probe batch.

    Rows go to ``analysis.jsonl`` and ``analysis.csv`` in ``folder`` (``log.rows`` is what a checkpoint
    keeps, so that resuming restores them). At epoch 0 and the last epoch it also saves, for the 2-D
    projection, the prompts entering each block (those of the first probe image: deep prompts are the same
    for every image) and a fixed sample of the probe's patch tokens, in ``projection_epoch<E>.safetensors``.
    Draws nothing from the global random state.
    """

    def __init__(
        self,
        model: ViTClassifier,
        probe: torch.Tensor,
        track: TrackConfig,
        epochs: int,
        folder: TrainingDir,
        seed: int,
    ) -> None:
        self.model, self.probe, self.track = model, probe, track
        self.epochs, self.folder, self.seed = epochs, folder, seed
        self.log = MetricsLog(folder, name=TrainingDir.ANALYSIS)

    def due(self, epoch: int) -> bool:
        return epoch == 0 or epoch % self.track.every == 0 or epoch == self.epochs

    def record(self, epoch: int) -> dict[str, Any]:
        started = time.perf_counter()
        layers = block_inputs(self.model, self.probe)
        statistics = [
            layer_statistics(layer, bins=self.track.bins, generator=torch.Generator().manual_seed(self.seed))
            for layer in layers
        ]
        if epoch in (0, self.epochs):
            self._save_projection(epoch, layers)
        row = flat_row(epoch, statistics) | {"analysis_time": time.perf_counter() - started}
        self.log.log(row)
        return row

    def _save_projection(self, epoch: int, layers: list[BlockInput]) -> None:
        patches = torch.stack([layer.patches.reshape(-1, layer.patches.shape[-1]) for layer in layers])
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(patches.shape[1], generator=generator)[: self.track.projection_tokens]
        tensors = {
            "prompts": torch.stack([layer.prompts[0] for layer in layers]).cpu().contiguous(),
            "patches": patches[:, chosen.sort().values.to(patches.device)].cpu().contiguous(),
        }
        atomic_write(
            self.folder.projection(epoch),
            lambda p: save_file(tensors, str(p), metadata={"epoch": str(epoch)}),
        )
