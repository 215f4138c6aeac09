"""A run folder's lifecycle, for ``selfprompt train`` and ``pretrain``: claimed under its lock, created or
checked against a resumed run's config, replaced after a non-finite loss, and its environment record. The
folder's layout (every file name) is :mod:`selfprompt.engine.rundir`'s."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selfprompt.config import RESUMABLE_CHANGES, RunOptions, flatten, migrate
from selfprompt.engine.distributed import Context, barrier, broadcast_
from selfprompt.engine.loop import DivergedError
from selfprompt.engine.rundir import RunDir, RunInUseError
from selfprompt.engine.speed import engine_record
from selfprompt.version import __version__

import numpy
import timm
import torch
import torchvision


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def changed_fields(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Fields whose value differs; a field the saved config lacks (added since) counts as its default."""
    old, new = flatten(defaults) | flatten(saved), flatten(current)
    return sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )


def prepare_run_dir(cfg: Any, ctx: Context, log: Callable[[str], None] = print) -> RunDir:
    """Create the run directory, or check that a resumed run's config is unchanged; never overwrite a run.

    Call it under :func:`claimed_run_dir`'s lock. A folder whose run never finished an epoch (a config and
    no checkpoint or result: it failed or was stopped before) does not count as a run: a new start, or a
    resume with a changed config, replaces its config. A run stopped by a non-finite loss is replaced by a
    new start (what it wrote is removed; a resume continues it). Temporary files that a killed writer left
    are removed. ``output_dir`` itself is not part of the comparison: a moved folder resumes where it is.
    """
    run = RunDir(Path(cfg.output_dir))
    out = run.path
    diverged = run.is_run() and run.diverged.is_file()
    replace = diverged and not cfg.resume
    if replace:
        log(f"note: {out} holds a run stopped by a non-finite loss; replacing it with a new start.")
    elif run.is_run() and run.has_progress():
        if not cfg.resume:
            raise FileExistsError(
                f"{out} already holds a run. Continue it with --resume true, or pick a new --output_dir."
            )
        saved = migrate(run.read_config())
        changed = changed_fields(saved, config_dict(cfg), config_dict(type(cfg)()))
        if changed:
            fix = (
                "It stopped on a non-finite training loss: start it again with --resume false and the new "
                "values (the new start replaces it)."
                if diverged
                else "Restore those values, or start a new run with another --output_dir."
            )
            raise ValueError(f"Cannot resume {out}: the config changed in {', '.join(changed)}. {fix}")
    elif run.is_run():
        log(f"note: {out} holds a run that never finished an epoch; starting it afresh with this config.")
    elif cfg.resume:
        raise FileNotFoundError(f"Nothing to resume: {run.config} does not exist.")
    barrier()  # every rank has checked before the main one writes
    if ctx.is_main:
        if replace:
            run.clear_training()
        run.diverged.unlink(missing_ok=True)
        run.remove_temporary_files()
        run.write_config(config_dict(cfg))
    barrier()
    return run


def _restart_fix(cfg: Any) -> str:
    """What to change after a non-finite loss, as options of a new start in the same folder."""
    clip = " or clip gradients (--optim.grad_clip 1.0)" if cfg.optim.grad_clip is None else ""
    return (
        f"start the run again with a lower learning rate (e.g. --optim.lr {cfg.optim.lr / 10:g}){clip} and "
        f"--resume false: a new start replaces this stopped run in {cfg.output_dir}"
    )


@contextlib.contextmanager
def claimed_run_dir(cfg: Any, ctx: Context) -> Iterator[RunDir]:
    """The run folder of ``cfg``, locked by the main process for the block (the other ranks learn whether it
    got the lock); :class:`~selfprompt.engine.rundir.RunInUseError` when another process holds it. A
    non-finite loss or adapter in the block is recorded in the folder (``diverged.json``), and the loss's
    error names the options of a new start (:func:`_restart_fix`)."""
    run = RunDir(Path(cfg.output_dir))
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                stack.enter_context(run.locked())
            except RunInUseError as caught:
                error = caught
        got = broadcast_(torch.tensor([error is None], dtype=torch.int64, device=ctx.device))
        if error is not None:
            raise error
        if not got.item():
            raise RunInUseError(f"{run.path} is in use by another selfprompt process (see rank 0's error).")
        try:
            yield run
        except FloatingPointError as stopped:  # recorded, so that a new start may replace the run
            if ctx.is_main and run.is_run():
                run.write_diverged(str(stopped))
            if isinstance(stopped, DivergedError):
                raise stopped.with_fix(_restart_fix(cfg)) from None
            raise


def run_environment(ctx: Context, run: RunOptions) -> dict[str, Any]:
    """Versions, command line, processes, device and engine options (:func:`engine_record`) of this run."""
    return {
        "versions": {
            "selfprompt": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "command": sys.argv,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device)
        if ctx.device.type == "cuda"
        else platform.processor(),
        "engine": engine_record(run, ctx),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
