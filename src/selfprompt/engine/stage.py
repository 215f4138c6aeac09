"""One stage of the protocol: build, initialise, run the epoch loop, evaluate, checkpoint, resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfprompt.config import OptimConfig, RunOptions, TrackConfig
from selfprompt.data.config import DataConfig
from selfprompt.data.splits import Splits
from selfprompt.engine.distributed import Context, broadcast_
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.loop import EpochLoop, classification_loss, evaluate, peak_memory_mb, training_loader
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.optim import build_optimizer, warmup_cosine
from selfprompt.engine.result import EVAL_SPLITS, StageResult
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.state import load_state, save_state
from selfprompt.engine.subspace import gradient_subspace
from selfprompt.engine.tracking import PromptTracker, probe_batch
from selfprompt.model import ViTClassifier

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

STAGE_NAMES = tuple(EVAL_SPLITS)  # tune, final


@dataclass
class Stage:
    """What one stage trains on and evaluates: tune (train -> val) or final (train+val -> test)."""

    name: str
    train: Dataset
    init: Dataset  # the training images with eval transforms, for SPT prototypes
    eval_name: str
    eval_set: Dataset
    eval_every_epoch: bool
    folder: TrainingDir


def build_stage(name: str, splits: Splits, run: RunDir, seed: int, select_on_test: bool = False) -> Stage:
    """Stage ``tune`` (train on train, evaluate val every epoch) or ``final`` (train on train+val, evaluate
    test once, or every epoch with ``select_on_test``, the unsafe reproduction of the official code)."""
    folder = run.stage(seed, name)
    if name == "tune":
        return Stage(name, splits.train, splits.init_train, EVAL_SPLITS[name], splits.val, True, folder)
    if name == "final":
        eval_name = EVAL_SPLITS[name]
        return Stage(
            name, splits.trainval, splits.init_trainval, eval_name, splits.test, select_on_test, folder
        )
    raise ValueError(f"Unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)} (or both).")


@dataclass(frozen=True)
class StageOptions:
    """The settings one stage reads: optimizer, loading, execution, tracking and evaluation cadence."""

    optim: OptimConfig
    batch_size: int
    eval_batch_size: int
    num_workers: int
    run: RunOptions
    track: TrackConfig
    eval_every: int = 1

    @classmethod
    def of(cls, optim: OptimConfig, data: DataConfig, run: RunOptions, track: TrackConfig, eval_every: int):
        return cls(optim, data.batch_size, data.eval_batch_size, data.num_workers, run, track, eval_every)


Preparer = Callable[[ViTClassifier, DataLoader, int], None]


def train_stage(
    stage: Stage,
    options: StageOptions,
    ctx: Context,
    build: Callable[[], ViTClassifier],
    prepare: Preparer | None,
    classes: list[str],
    seed: int,
    log: Callable[[str], None],
) -> StageResult:
    """Train one stage to its end (or resume it) and return its result; writes into ``stage.folder``.

    ``build()`` makes the model (under ``torch.manual_seed(seed)``); ``prepare(model, loader, seed)``, when
    given, initialises it from the training images (prompts) on the main process before the first step.
    """
    folder, opt, run = stage.folder, options.optim, options.run
    label = f"{stage.name} seed {seed}"
    if run.resume and folder.result.is_file():
        log(f"[{label}] already finished: {folder.result}")
        return folder.read_result()
    sampler, loader, steps = training_loader(
        stage.train, options.batch_size, opt.accumulate, options.num_workers, ctx, seed,
        f"The {stage.name} training split",
    )  # fmt: skip

    torch.manual_seed(seed)
    model = build().to(ctx.device)
    optimizer = build_optimizer(model, opt)
    scheduler = warmup_cosine(optimizer, opt.warmup_epochs * steps, opt.epochs * steps, opt.lr, opt.min_lr)
    ema = ParameterEMA(model.adapter_parameters(), opt.ema_decay) if opt.ema_decay else None
    subspace = gradient_subspace(model, opt)
    metrics = MetricsLog(folder, run.tensorboard) if ctx.is_main else None
    tracker = None
    if options.track.every and ctx.is_main:  # the main process only
        probe = probe_batch(stage.init, options.track.probe_images, seed).to(ctx.device)
        tracker = PromptTracker(model, probe, options.track, opt.epochs, folder, seed)
    start_epoch, best = 1, {}
    if run.resume and folder.state.is_file():
        state = load_state(folder.state, ctx, model.adapter_parameters(), optimizer, scheduler)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if subspace is not None:
            subspace.load_state_dict(state["subspace"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if metrics is not None:
            metrics.restore(state["history"])
        if tracker is not None:
            tracker.log.restore(state["analysis"])
        log(f"[{label}] resuming after epoch {state['epoch']}")
    else:
        if prepare is not None:
            if ctx.is_main:  # computed once, then broadcast
                loader_ = DataLoader(
                    stage.init, batch_size=options.eval_batch_size, num_workers=options.num_workers
                )
                prepare(model, loader_, seed)
            for param in model.adapter_parameters().values():
                broadcast_(param.data)
        if metrics is not None:
            metrics.restore([])
        if tracker is not None:
            tracker.log.restore([])
            tracker.record(0)
        torch.manual_seed(seed * 1000 + ctx.rank)  # each rank its own dropout stream
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    trainable = model.num_adapter_parameters()
    total = sum(p.numel() for p in model.parameters())

    def evaluate_epoch(epoch: int) -> dict[str, Any]:
        nonlocal best
        if not (epoch == opt.epochs or (stage.eval_every_epoch and epoch % options.eval_every == 0)):
            return {}
        eval_batch = max(1, options.eval_batch_size // ctx.world_size)
        eval_args = (stage.eval_set, ctx, eval_batch, run.precision, options.num_workers)
        scores = evaluate(model, *eval_args)
        row = {f"{stage.eval_name}_{k}": v for k, v in scores.items()}
        if ema is not None:
            with ema.applied():
                row |= {f"ema_{stage.eval_name}_{k}": v for k, v in evaluate(model, *eval_args).items()}
        if scores["acc"] > best.get("acc", -1.0):
            best = {"acc": scores["acc"], "epoch": epoch}
        return row

    def end_epoch(epoch: int) -> None:
        if tracker is not None and tracker.due(epoch):
            tracker.record(epoch)
        save_state(
            folder.state,
            ctx,
            epoch,
            model.adapter_parameters(),
            optimizer,
            scheduler,
            ema=ema.state_dict() if ema is not None else None,
            subspace=subspace.state_dict() if subspace is not None else None,
            best=best,
            history=metrics.rows if metrics is not None else None,
            analysis=tracker.log.rows if tracker is not None else None,
        )

    loop = EpochLoop(
        net, model, loader, sampler, steps, classification_loss, optimizer, scheduler, ctx, run.precision,
        label, log, metrics, accumulate=opt.accumulate, grad_clip=opt.grad_clip, ema=ema,
        subspace=subspace, progress=run.progress,
    )  # fmt: skip
    epoch_times = loop.run(start_epoch, opt.epochs, evaluate_epoch, end_epoch)

    last = metrics.rows[-1] if metrics else None
    result = StageResult(
        stage=stage.name,
        seed=seed,
        epochs=opt.epochs,
        last_acc=last[f"{stage.eval_name}_acc"] if last else None,
        best_acc=best.get("acc"),
        best_epoch=best.get("epoch"),
        trainable_parameters=trainable,
        trainable_share=trainable / total,
        seconds_per_epoch=sum(epoch_times) / len(epoch_times) if epoch_times else None,
        peak_memory_mb=peak_memory_mb(ctx),
        selected_on_test=stage.eval_name == "test" and stage.eval_every_epoch,
        last_ema_acc=last[f"ema_{stage.eval_name}_acc"] if ema is not None and last else None,
    )
    if ctx.is_main:
        model.save_pretrained(folder.adapter())
        if ema is not None:
            with ema.applied():
                model.save_pretrained(folder.adapter(ema=True))
        folder.write_classes(classes)
        folder.write_result(result)
        metrics.close()
    return result
