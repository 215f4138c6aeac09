"""One training stage: build, initialise, train epoch by epoch, evaluate, checkpoint, resume."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.build import build_model, init_method
from selfprompt.checkpoint import atomic_write
from selfprompt.config import TrainConfig
from selfprompt.engine.distributed import Context, ShardSampler, all_reduce_sum, broadcast_
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.optim import build_optimizer, warmup_cosine
from selfprompt.engine.tracking import PromptTracker, probe_batch
from selfprompt.init import init_prompts
from selfprompt.model import PromptedViT, ViTClassifier

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

STATE_NAME = "state.pt"
RESULT_NAME = "result.json"


@dataclass
class Stage:
    """What one stage trains on and evaluates: tune (train -> val) or final (train+val -> test)."""

    name: str
    train: Dataset
    init: Dataset  # the training images with eval transforms, for SPT prototypes
    eval_name: str
    eval_set: Dataset
    eval_every_epoch: bool
    directory: Path


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


def _initialise_prompts(
    cfg: TrainConfig, ctx: Context, model: ViTClassifier, stage: Stage, seed: int
) -> None:
    if not isinstance(model, PromptedViT):
        return
    if cfg.model.prompts_file is not None:
        prompts = load_file(cfg.model.prompts_file)["prompts"]
        if prompts.shape != model.prompts.shape:
            raise ValueError(
                f"{cfg.model.prompts_file} holds prompts of shape {tuple(prompts.shape)}, the model needs "
                f"{tuple(model.prompts.shape)}."
            )
        with torch.no_grad():
            model.prompts.copy_(prompts)
        return
    if ctx.is_main:  # computed once, then broadcast
        loader = DataLoader(stage.init, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
        init_prompts(
            model,
            loader,
            init_method(cfg.model),
            fraction=cfg.model.init_fraction,
            max_images=cfg.model.init_max_images,
            seed=seed,
        )
    broadcast_(model.prompts.data)


def _peak_memory_mb(ctx: Context) -> float:
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_stage(
    cfg: TrainConfig,
    ctx: Context,
    stage: Stage,
    make_backbone: Callable[[], nn.Module],
    num_classes: int,
    classes: list[str],
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train one stage to its end (or resume it) and return its result; writes into ``stage.directory``."""
    result_path = stage.directory / RESULT_NAME
    if cfg.resume and result_path.is_file():
        log(f"[{stage.name} seed {seed}] already finished: {result_path}")
        return json.loads(result_path.read_text())
    opt = cfg.optim
    sampler, loader, steps_per_epoch = training_loader(
        stage.train, cfg.data.batch_size, opt.accumulate, cfg.data.num_workers, ctx, seed,
        f"The {stage.name} training split",
    )  # fmt: skip

    torch.manual_seed(seed)
    model = build_model(cfg.model, make_backbone(), num_classes).to(ctx.device)
    optimizer = build_optimizer(model, opt)
    scheduler = warmup_cosine(
        optimizer, opt.warmup_epochs * steps_per_epoch, opt.epochs * steps_per_epoch, opt.lr, opt.min_lr
    )
    ema = ParameterEMA(model.adapter_parameters(), opt.ema_decay) if opt.ema_decay else None
    metrics = MetricsLog(stage.directory, cfg.tensorboard) if ctx.is_main else None
    tracker = None
    if cfg.track.every and ctx.is_main and isinstance(model, PromptedViT):  # the main process only
        probe = probe_batch(stage.init, cfg.track.probe_images, seed).to(ctx.device)
        tracker = PromptTracker(model, probe, cfg.track, opt.epochs, stage.directory, seed)
    state_path = stage.directory / STATE_NAME
    start_epoch, best = 1, {}
    if cfg.resume and state_path.is_file():
        state = load_state(state_path, ctx, model.adapter_parameters(), optimizer, scheduler)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if metrics is not None:
            metrics.restore(state["history"])
        if tracker is not None:
            tracker.log.restore(state["analysis"])
        log(f"[{stage.name} seed {seed}] resuming after epoch {state['epoch']}")
    else:
        _initialise_prompts(cfg, ctx, model, stage, seed)
        if metrics is not None:
            metrics.restore([])
        if tracker is not None:
            tracker.log.restore([])
            tracker.record(0)
        torch.manual_seed(seed * 1000 + ctx.rank)  # each rank its own dropout stream
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    trainable = model.num_adapter_parameters()
    total = sum(p.numel() for p in model.parameters())

    epoch_times = []
    for epoch in range(start_epoch, opt.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{stage.name} seed {seed} epoch {epoch}/{opt.epochs}",
            disable=not (cfg.progress and ctx.is_main),
            leave=False,
        )
        loss_sum, data_time = train_epoch(
            net,
            iter(loader),
            steps_per_epoch,
            classification_loss,
            optimizer,
            scheduler,
            ctx,
            cfg.precision,
            accumulate=opt.accumulate,
            grad_clip=opt.grad_clip,
            ema=ema,
            bar=bar,
        )
        bar.close()
        train_loss = checked_loss(loss_sum, steps_per_epoch, ctx, f"{stage.name} seed {seed}", epoch)
        epoch_time = time.perf_counter() - started
        epoch_times.append(epoch_time)
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "epoch_time": epoch_time,
            "data_time": data_time,
        }
        is_last = epoch == opt.epochs
        if is_last or (stage.eval_every_epoch and epoch % cfg.eval_every == 0):
            eval_batch = max(1, cfg.data.eval_batch_size // ctx.world_size)
            eval_args = (stage.eval_set, ctx, eval_batch, cfg.precision, cfg.data.num_workers)
            scores = evaluate(model, *eval_args)
            row |= {f"{stage.eval_name}_{k}": v for k, v in scores.items()}
            if ema is not None:
                with ema.applied():
                    row |= {f"ema_{stage.eval_name}_{k}": v for k, v in evaluate(model, *eval_args).items()}
            if scores["acc"] > best.get("acc", -1.0):
                best = {"acc": scores["acc"], "epoch": epoch}
        if ctx.is_main:
            metrics.log(row)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
            eta = (opt.epochs - epoch) * sum(epoch_times) / len(epoch_times)
            log(f"[{stage.name} seed {seed}] epoch {epoch}/{opt.epochs}: {shown}, stage eta {eta:.0f}s")
        if tracker is not None and tracker.due(epoch):
            tracker.record(epoch)
        save_state(
            state_path,
            ctx,
            epoch,
            model.adapter_parameters(),
            optimizer,
            scheduler,
            ema=ema.state_dict() if ema is not None else None,
            best=best,
            history=metrics.rows if metrics is not None else None,
            analysis=tracker.log.rows if tracker is not None else None,
        )

    result: dict[str, Any] = {
        "stage": stage.name,
        "seed": seed,
        "epochs": opt.epochs,
        f"last_{stage.eval_name}_acc": metrics.rows[-1][f"{stage.eval_name}_acc"] if metrics else None,
        f"best_{stage.eval_name}_acc": best.get("acc"),
        "best_epoch": best.get("epoch"),
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "seconds_per_epoch": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "peak_memory_mb": _peak_memory_mb(ctx),
        "selected_on_test": stage.eval_name == "test" and stage.eval_every_epoch,
    }
    if ema is not None and metrics:
        result[f"last_ema_{stage.eval_name}_acc"] = metrics.rows[-1][f"ema_{stage.eval_name}_acc"]
    if ctx.is_main:
        model.save_pretrained(stage.directory / "adapter")
        if ema is not None:
            with ema.applied():
                model.save_pretrained(stage.directory / "adapter_ema")
        atomic_write(stage.directory / "classes.json", lambda p: p.write_text(json.dumps(classes)))
        atomic_write(result_path, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
        metrics.close()
    return result


def save_state(
    path: Path,
    ctx: Context,
    epoch: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    **extra: Any,
) -> None:
    """Checkpoint the end of ``epoch`` atomically (every rank calls it: each rank's RNG state is kept)."""
    rng = _gather_rng_states(ctx)
    if not ctx.is_main:
        return
    state = {
        "epoch": epoch,
        "adapter": {k: p.detach().cpu() for k, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        **extra,
    }
    atomic_write(path, lambda p: torch.save(state, p))


def load_state(
    path: Path,
    ctx: Context,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote into ``params``, the optimizer, the scheduler and this rank's
    RNG; returns the whole state (its epoch and extras)."""
    state = torch.load(path, map_location=ctx.device, weights_only=True)
    if len(state["rng"]) != ctx.world_size:
        raise ValueError(
            f"{path} was written by {len(state['rng'])} process(es); resume with as many "
            f"(now {ctx.world_size}), so that the data order and the result stay the same."
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["adapter"][k])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank]
    torch.set_rng_state(rng["cpu"].cpu())
    if rng.get("cuda") is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), ctx.device)
    return state


def _gather_rng_states(ctx: Context) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (each rank's dropout stream), collected on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if ctx.world_size == 1:
        return [state]
    import torch.distributed as dist

    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered
