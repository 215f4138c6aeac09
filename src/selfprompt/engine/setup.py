"""One training run's setup, the same for every stage of ``selfprompt train`` and for ``pretrain``: the
loader, AdamW and its schedule, the metrics log, the resumed checkpoint, and the epoch loop over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfprompt.config import OptimConfig, RunOptions
from selfprompt.engine.distributed import Context
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.loop import EpochLoop, LossFn, SeededSampler, training_loader
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.optim import adamw, warmup_cosine
from selfprompt.engine.rundir import TrainingDir
from selfprompt.engine.speed import (
    ResidentLoader,
    autocast_dtype,
    compiled,
    prepare_model,
    set_tf32,
    uses_fused_adamw,
)
from selfprompt.engine.state import load_state, save_state
from selfprompt.engine.subspace import GradientSubspace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class TrainingOptions:
    """What a training setup reads: the optimizer and schedule, the loading, and how the run executes."""

    optim: OptimConfig
    batch_size: int
    eval_batch_size: int
    num_workers: int
    run: RunOptions

    @classmethod
    def of(cls, optim: OptimConfig, data: Any, run: RunOptions) -> TrainingOptions:
        """From a config's ``optim`` and ``data`` sections and its run options."""
        return cls(optim, data.batch_size, data.eval_batch_size, data.num_workers, run)


@dataclass
class TrainingSetup:
    """What one training run trains with, at its first epoch or where its checkpoint stopped.

    ``state`` is the checkpoint a resumed run restored (its epoch and extras; the trained tensors, the
    optimizer, the scheduler and this rank's RNG are already back in place), None on a new start.
    """

    options: TrainingOptions
    ctx: Context
    folder: TrainingDir
    label: str
    log: Callable[[str], None]
    params: dict[str, torch.Tensor]
    sampler: SeededSampler
    loader: DataLoader | ResidentLoader
    steps: int
    optimizer: torch.optim.AdamW
    scheduler: LRScheduler
    metrics: MetricsLog | None
    state: dict[str, Any] | None

    @property
    def start_epoch(self) -> int:
        return 1 if self.state is None else self.state["epoch"] + 1

    def loop(
        self,
        model: nn.Module,
        compute_loss: LossFn,
        ema: ParameterEMA | None = None,
        subspace: GradientSubspace | None = None,
    ) -> EpochLoop:
        """The epoch loop of this setup over ``model`` (in DDP when there are several processes), with the
        engine options applied (``prepare_model``, ``compiled``): call it after the model's initialisation."""
        opt, run = self.options.optim, self.options.run
        prepare_model(model, run)
        net = compiled(DistributedDataParallel(model) if self.ctx.world_size > 1 else model, run)
        return EpochLoop(
            net, model, self.loader, self.sampler, self.steps, compute_loss, self.optimizer, self.scheduler,
            self.ctx, run.precision, self.label, self.log, self.metrics, accumulate=opt.accumulate,
            grad_clip=opt.grad_clip, ema=ema, subspace=subspace, progress=run.progress,
        )  # fmt: skip

    def save(self, epoch: int, **extra: Any) -> None:
        """Checkpoint the end of ``epoch`` with the metrics' history and ``extra`` (every rank calls it)."""
        history = self.metrics.rows if self.metrics is not None else None
        save_state(
            self.folder.state, self.ctx, epoch, self.params, self.optimizer, self.scheduler,
            history=history, **extra,
        )  # fmt: skip


def training_setup(
    params: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
    train: Dataset,
    options: TrainingOptions,
    ctx: Context,
    seed: int,
    folder: TrainingDir,
    *,
    label: str,
    log: Callable[[str], None],
    what: str,
) -> TrainingSetup:
    """Set up training ``params`` (AdamW over ``groups``) on ``train`` (named ``what`` in errors), writing
    into ``folder``; with ``options.run.resume`` and a checkpoint there, restore it (``label`` prefixes the
    log lines)."""
    opt, run = options.optim, options.run
    sampler, loader, steps = training_loader(
        train, options.batch_size, opt.accumulate, options.num_workers, ctx, seed, what
    )
    if run.device_data:
        loader = ResidentLoader(loader, ctx.device, autocast_dtype(ctx, run.precision))
    set_tf32(run, ctx)
    optimizer = adamw(groups, opt, fused=uses_fused_adamw(run, ctx))
    scheduler = warmup_cosine(optimizer, opt.warmup_epochs * steps, opt.epochs * steps, opt.lr, opt.min_lr)
    metrics = MetricsLog(folder, run.tensorboard) if ctx.is_main else None
    state = None
    if run.resume and folder.state.is_file():
        state = load_state(folder.state, ctx, params, optimizer, scheduler)
        log(f"[{label}] resuming after epoch {state['epoch']}")
    if metrics is not None:
        metrics.restore(state["history"] if state is not None else [])
    return TrainingSetup(
        options, ctx, folder, label, log, params, sampler, loader, steps, optimizer, scheduler, metrics, state
    )
