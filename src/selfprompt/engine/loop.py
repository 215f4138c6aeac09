"""The one epoch loop of training and pretraining, its steps, evaluation and the training loader.

Random streams, and why a resumed run is exact: the engine owns two.

- The *data stream*: the order of the samples (:class:`~torch.utils.data.DistributedSampler`, seeded from the
  run seed and the epoch) and their augmentation. Each sample is transformed under its own seed,
  :func:`sample_seed` ``(run seed, epoch, index)`` (:class:`SeededSampler` hands it to
  :class:`SeededSamples`), so a crop or a flip does not depend on which worker process loads the sample, on
  how many workers there are, on persistent workers having started earlier, or on any global random state.
  The loader has its own ``torch.Generator``: creating or iterating it draws nothing from the global state.
- The *model stream*: the process's global torch RNG (CPU and CUDA), which dropout and drop-path draw from.
  Each stage seeds it (``seed * 1000 + rank``), every checkpoint saves it and a resume restores it. Each
  epoch starts with one 64-bit draw from it (:func:`advance_model_stream`): the draw the loader's iterator
  took from it before the data stream was separated, kept so that runs recorded then stay bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selfprompt.engine.distributed import Context, ShardSampler, all_reduce_sum
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.speed import ResidentLoader, autocast_dtype
from selfprompt.engine.subspace import GradientSubspace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm


def autocast(ctx: Context, precision: str):
    return torch.autocast(
        ctx.device.type, dtype=torch.bfloat16, enabled=autocast_dtype(ctx, precision) is not None
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    ctx: Context,
    batch_size: int,
    precision: str,
    num_workers: int = 0,
    confusion: bool = False,
) -> dict[str, Any]:
    """Exact accuracy and mean loss: each sample counted once across all processes; with ``confusion`` also
    the confusion matrix (``confusion``: counts, rows the true class, columns the predicted one)."""
    model.eval()
    sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct, loss sum, count
    matrix = None
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        with autocast(ctx, precision):
            logits = model(images)
        predicted = logits.argmax(1)
        totals[0] += (predicted == labels).sum()
        totals[1] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[2] += len(labels)
        if confusion:
            if matrix is None:
                matrix = torch.zeros(logits.shape[1], logits.shape[1], dtype=torch.float64, device=ctx.device)
            ones = torch.ones_like(labels, dtype=torch.float64)
            matrix.index_put_((labels, predicted), ones, accumulate=True)
    correct, loss, count = all_reduce_sum(totals).tolist()
    scores: dict[str, Any] = {"acc": correct / count, "loss": loss / count}
    if matrix is not None:
        scores["confusion"] = all_reduce_sum(matrix).cpu()
    return scores


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(images).float(), labels)


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value for every 64-bit input."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed that sample ``index`` is augmented under in ``epoch`` of a run seeded ``seed`` (< 2**63)."""
    mixed = 0
    for part in (seed, epoch, index):
        mixed = _mix64(mixed ^ (part & _MASK64))
    return mixed >> 1


class SeededSampler(Sampler[tuple[int, int]]):
    """A sampler's indices, each paired with its :func:`sample_seed`: ``(index, seed)``."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, sample_seed(self.seed, self.epoch, index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` computed under ``torch.manual_seed(seed)`` for a key ``(index, seed)``; the global
    torch RNG of the process that loads it (a worker or the main process) is left as it was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def advance_model_stream() -> None:
    """The one 64-bit draw from the global RNG that starts every training epoch (see the module's notes)."""
    torch.empty((), dtype=torch.int64).random_()


def training_loader(
    dataset: Dataset, batch_size: int, accumulate: int, num_workers: int, ctx: Context, seed: int, what: str
) -> tuple[SeededSampler, DataLoader, int]:
    """The shuffled, sharded loader of one training run: ``(sampler, loader, optimizer steps per epoch)``.

    ``batch_size`` is global (over processes and accumulation steps); ``what`` names the dataset in errors.
    The order and the augmentation of every epoch are functions of ``seed`` and the epoch only (the module's
    notes); call ``sampler.set_epoch(epoch)`` before each epoch.
    """
    micro = check_batch(len(dataset), batch_size, accumulate, ctx.world_size, what)  # type: ignore[arg-type]
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=micro,
        sampler=SeededSampler(sampler, seed),
        drop_last=True,
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader.sampler, loader, len(loader) // accumulate  # type: ignore[return-value]


def check_batch(images: int, batch_size: int, accumulate: int, world_size: int, what: str) -> int:
    """The per-process micro-batch of a global ``batch_size``; an error names the field and the fix when
    it does not divide over processes and accumulation steps or the split (``what``, ``images`` long)
    holds less than one optimizer step."""
    micro, remainder = divmod(batch_size, world_size * accumulate)
    if remainder or micro == 0:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be a multiple of processes x optim.accumulate "
            f"({world_size} x {accumulate}); change --data.batch_size or --optim.accumulate."
        )
    if images // world_size // micro // accumulate == 0:
        raise ValueError(
            f"{what} has {images} images, fewer than one global batch ({batch_size}); lower "
            f"--data.batch_size to at most {images // (world_size * accumulate) * world_size * accumulate}."
        )
    return micro


def train_epoch(
    net: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    compute_loss: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    precision: str,
    *,
    accumulate: int = 1,
    grad_clip: float | None = None,
    ema: ParameterEMA | None = None,
    subspace: GradientSubspace | None = None,
    bar: tqdm | None = None,
) -> tuple[torch.Tensor, float]:
    """``steps`` optimizer steps of ``accumulate`` micro-batches each (DDP syncs on the last one only).

    Returns the summed per-step loss (a device tensor, not synchronised) and the seconds spent waiting
    for data.
    """
    inner = getattr(net, "_orig_mod", net)  # under torch.compile's wrapper
    model = inner.module if isinstance(inner, DistributedDataParallel) else inner
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, data_time = torch.zeros((), device=ctx.device), 0.0
    for _ in range(steps):
        for micro_step in range(accumulate):
            fetched = time.perf_counter()
            images, labels = next(batches)
            data_time += time.perf_counter() - fetched
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            last = micro_step == accumulate - 1
            sync = contextlib.nullcontext() if last or inner is model else inner.no_sync()
            with sync:
                with autocast(ctx, precision):
                    loss = compute_loss(net, images, labels)
                (loss / accumulate).backward()
            loss_sum += loss.detach() / accumulate
        if subspace is not None:
            subspace.step()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update()
        if bar is not None:
            bar.update()
    return loss_sum, data_time


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite; ``str()`` says where and what to change."""

    def __init__(
        self, where: str, epoch: int, loss: float, fix: str = "lower optim.lr or set optim.grad_clip"
    ) -> None:
        super().__init__(f"[{where}] the training loss became {loss} in epoch {epoch}; {fix}.")
        self.where, self.epoch, self.loss = where, epoch, loss

    def with_fix(self, fix: str) -> DivergedError:
        """The same error with ``fix`` as what to change (a run names its exact options)."""
        return DivergedError(self.where, self.epoch, self.loss, fix)


def checked_loss(total: torch.Tensor, steps: int, ctx: Context, where: str, epoch: int) -> float:
    """The mean loss over all processes; a non-finite one stops the run (:class:`DivergedError`)."""
    loss = all_reduce_sum(total).item() / (steps * ctx.world_size)
    if not math.isfinite(loss):
        raise DivergedError(where, epoch, loss)
    return loss


def peak_memory_mb(ctx: Context) -> float:
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class EpochLoop:
    """One training run's loop: the same for every stage of ``selfprompt train`` and for ``pretrain``.

    ``net`` is ``model`` or its DDP wrapper; ``label`` prefixes the log lines and the progress bar.
    """

    net: nn.Module
    model: nn.Module
    loader: DataLoader | ResidentLoader
    sampler: SeededSampler
    steps: int
    compute_loss: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ctx: Context
    precision: str
    label: str
    log: Callable[[str], None]
    metrics: MetricsLog | None = None
    accumulate: int = 1
    grad_clip: float | None = None
    ema: ParameterEMA | None = None
    subspace: GradientSubspace | None = None
    progress: bool = True

    def run(
        self,
        start_epoch: int,
        epochs: int,
        evaluate_epoch: Callable[[int], dict[str, Any]],
        end_epoch: Callable[[int], None],
    ) -> list[float]:
        """Train epochs ``start_epoch..epochs``; after each, ``evaluate_epoch(epoch)`` adds its scores to the
        metrics row, which is logged, then ``end_epoch(epoch)`` runs (tracking, the state checkpoint).
        Returns the epochs' wall times."""
        epoch_times: list[float] = []
        for epoch in range(start_epoch, epochs + 1):
            self.sampler.set_epoch(epoch)
            self.model.train()
            started = time.perf_counter()
            bar = tqdm(
                total=self.steps,
                desc=f"{self.label} epoch {epoch}/{epochs}",
                disable=not (
                    self.progress and self.ctx.is_main and sys.stderr.isatty()
                ),  # a log: epoch lines
                leave=False,
            )
            advance_model_stream()
            loss_sum, data_time = train_epoch(
                self.net, iter(self.loader), self.steps, self.compute_loss, self.optimizer, self.scheduler,
                self.ctx, self.precision, accumulate=self.accumulate, grad_clip=self.grad_clip, ema=self.ema,
                subspace=self.subspace, bar=bar,
            )  # fmt: skip
            bar.close()
            train_loss = checked_loss(loss_sum, self.steps, self.ctx, self.label, epoch)
            epoch_time = time.perf_counter() - started
            epoch_times.append(epoch_time)
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": epoch * self.steps,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "epoch_time": epoch_time,
                "data_time": data_time,
            }
            row |= evaluate_epoch(epoch)
            if self.metrics is not None:
                self.metrics.log(row)
                shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
                eta = (epochs - epoch) * sum(epoch_times) / len(epoch_times)
                self.log(f"[{self.label}] epoch {epoch}/{epochs}: {shown}, eta {eta:.0f}s")
            end_epoch(epoch)
        return epoch_times
