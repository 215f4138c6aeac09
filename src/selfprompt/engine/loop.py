"""The one epoch loop of training and pretraining, its steps, evaluation and the training loader."""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selfprompt.engine.distributed import Context, ShardSampler, all_reduce_sum
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.metrics import MetricsLog

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm


def autocast(ctx: Context, precision: str):
    use_bf16 = precision == "bf16" or (
        precision == "auto" and ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, ctx: Context, batch_size: int, precision: str, num_workers: int = 0
) -> dict[str, float]:
    """Exact accuracy and mean loss: each sample counted once across all processes."""
    model.eval()
    sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct, loss sum, count
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        with autocast(ctx, precision):
            logits = model(images)
        totals[0] += (logits.argmax(1) == labels).sum()
        totals[1] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[2] += len(labels)
    correct, loss, count = all_reduce_sum(totals).tolist()
    return {"acc": correct / count, "loss": loss / count}


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(images).float(), labels)


def training_loader(
    dataset: Dataset, batch_size: int, accumulate: int, num_workers: int, ctx: Context, seed: int, what: str
) -> tuple[DistributedSampler, DataLoader, int]:
    """The shuffled, sharded loader of one training run: ``(sampler, loader, optimizer steps per epoch)``.

    ``batch_size`` is global (over processes and accumulation steps); ``what`` names the dataset in errors.
    """
    micro, remainder = divmod(batch_size, ctx.world_size * accumulate)
    if remainder or micro == 0:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be a multiple of processes x optim.accumulate "
            f"({ctx.world_size} x {accumulate})."
        )
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    steps = len(loader) // accumulate
    if steps == 0:
        raise ValueError(
            f"{what} has {len(dataset)} images, fewer than one global batch ({batch_size}); lower "
            f"data.batch_size."
        )
    return sampler, loader, steps


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
    bar: tqdm | None = None,
) -> tuple[torch.Tensor, float]:
    """``steps`` optimizer steps of ``accumulate`` micro-batches each (DDP syncs on the last one only).

    Returns the summed per-step loss (a device tensor, not synchronised) and the seconds spent waiting
    for data.
    """
    model = net.module if isinstance(net, DistributedDataParallel) else net
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
            sync = contextlib.nullcontext() if last or net is model else net.no_sync()
            with sync:
                with autocast(ctx, precision):
                    loss = compute_loss(net, images, labels)
                (loss / accumulate).backward()
            loss_sum += loss.detach() / accumulate
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


def checked_loss(total: torch.Tensor, steps: int, ctx: Context, where: str, epoch: int) -> float:
    """The mean loss over all processes; a non-finite one stops the run with what to change."""
    loss = all_reduce_sum(total).item() / (steps * ctx.world_size)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"[{where}] the training loss became {loss} in epoch {epoch}; lower optim.lr or set "
            f"optim.grad_clip."
        )
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
    loader: DataLoader
    sampler: DistributedSampler
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
                disable=not (self.progress and self.ctx.is_main),
                leave=False,
            )
            loss_sum, data_time = train_epoch(
                self.net, iter(self.loader), self.steps, self.compute_loss, self.optimizer, self.scheduler,
                self.ctx, self.precision, accumulate=self.accumulate, grad_clip=self.grad_clip, ema=self.ema,
                bar=bar,
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
