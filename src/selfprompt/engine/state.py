"""The resumable training state: trained tensors, optimizer, scheduler, every rank's RNG and extras."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write
from selfprompt.engine.distributed import Context

import torch
import torch.distributed as dist


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
    state = read_state(path, ctx.device)
    if set(state["adapter"]) != set(params):
        raise ValueError(
            f"{path} holds tensors {sorted(state['adapter'])}, this run trains {sorted(params)}: it is not "
            f"this run's state. {_RESTART.format(path=path)}"
        )
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


_RESTART = "Delete {path} to train this stage again from its first epoch, or restore the file."
STATE_KEYS = ("epoch", "adapter", "optimizer", "scheduler", "rng")


def read_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A training state file as :func:`save_state` wrote it; a damaged, cut-short or foreign file is a
    ValueError that names it and the fix."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise ValueError(
                f"{path} is not a selfprompt training state: it holds pickled Python objects, which "
                f"selfprompt does not load. {_RESTART.format(path=path)}"
            ) from None
        raise ValueError(f"{path} is damaged ({error}). {_RESTART.format(path=path)}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} cannot be read: it is damaged or cut short ({first}). {_RESTART.format(path=path)}"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise ValueError(
            f"{path} is not a selfprompt training state (it lacks "
            f"{[k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]}). "
            f"{_RESTART.format(path=path)}"
        )
    return state


def _gather_rng_states(ctx: Context) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (each rank's dropout stream), collected on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if ctx.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered
