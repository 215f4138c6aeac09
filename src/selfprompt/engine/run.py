"""The protocol as code: per seed, tune (train -> val) then final (train+val -> test once); a summary."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selfprompt.backbones import backbone_info
from selfprompt.config import RESUMABLE_CHANGES, TrainConfig, check_config, flatten, migrate
from selfprompt.data.splits import Splits, build_splits, preprocessing
from selfprompt.engine.build import build_model, create_backbone, head_input, method_settings, preparer
from selfprompt.engine.distributed import Context, barrier, broadcast_, setup, teardown
from selfprompt.engine.loop import DivergedError, check_batch
from selfprompt.engine.result import StageResult, headline_key
from selfprompt.engine.rundir import RunDir, RunInUseError
from selfprompt.engine.stage import STAGE_NAMES, StageOptions, build_stage, train_stage
from selfprompt.engine.tracking import check_track
from selfprompt.init.registry import get_initializer
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


def check_batches(cfg: TrainConfig, splits: Splits, ctx: Context) -> None:
    """Each stage's training split holds at least one optimizer step at the configured batch size."""
    stages = STAGE_NAMES if cfg.stage == "both" else (cfg.stage,)
    for name, dataset in (("tune", splits.train), ("final", splits.trainval)):
        if name in stages:
            what = f"The {name} training split ({'train' if name == 'tune' else 'train+val'})"
            check_batch(len(dataset), cfg.data.batch_size, cfg.optim.accumulate, ctx.world_size, what)


def run_environment(ctx: Context) -> dict[str, Any]:
    """Versions, command line, processes and device of this run."""
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
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def backbone_record(cfg: TrainConfig, backbone: torch.nn.Module) -> dict[str, Any]:
    """Where the backbone's weights came from, their licence and load report, and the head input and
    preprocessing this run resolved for it."""
    pre = preprocessing(cfg.data, backbone)
    return {
        **backbone_info(backbone).as_dict(),
        "head_input": head_input(cfg.model, backbone),
        "preprocessing": json.loads(json.dumps(pre)),
    }


def environment(cfg: TrainConfig, ctx: Context, splits: Splits, backbone: dict[str, Any]) -> dict[str, Any]:
    return {
        **run_environment(ctx),
        "backbone": backbone,
        "seeds": cfg.seeds,
        "data_fingerprints": splits.fingerprints(),
        "classes": splits.classes,
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(results: list[StageResult]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each stage's headline numbers."""
    summary: dict[str, Any] = {}
    for stage in STAGE_NAMES:
        rows = [r for r in results if r.stage == stage]
        if not rows:
            continue
        summary[stage] = {
            rows[0].headline_key: _mean_std([r.headline for r in rows]),
            "seeds": [r.seed for r in rows],
            "seconds_per_epoch": _mean_std([r.seconds_per_epoch for r in rows if r.seconds_per_epoch])
            if any(r.seconds_per_epoch for r in rows)
            else None,
            "peak_memory_mb": max(r.peak_memory_mb for r in rows),
            "selected_on_test": rows[0].selected_on_test,
        }
        summary["trainable_parameters"] = rows[0].trainable_parameters
        summary["trainable_share"] = rows[0].trainable_share
    return summary


def format_summary(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    backbone = summary.get("backbone", {})
    name = backbone.get("name", cfg.model.backbone)
    lines = [f"{cfg.model.method} on {cfg.data.root} ({name}), seeds {cfg.seeds}"]
    if backbone:
        where = backbone["format"]
        if backbone["checkpoint"]:
            where = f"{backbone['checkpoint']} ({where})"
        lines.append(f"  backbone weights: {where}, licence {backbone['license']}")
        if backbone["license"].startswith("cc-by-nc"):
            lines.append("  NOTE: these weights are licensed for non-commercial use only.")
    for stage in STAGE_NAMES:
        if stage not in summary:
            continue
        s = summary[stage]
        key = headline_key(stage, s["selected_on_test"])
        acc = s[key]
        per_epoch = f", {s['seconds_per_epoch']['mean']:.1f} s/epoch" if s["seconds_per_epoch"] else ""
        lines.append(
            f"  {stage:5s} {key}: {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}{per_epoch}, "
            f"peak memory {s['peak_memory_mb']:.0f} MB"
        )
        if s["selected_on_test"]:
            lines.append(
                "  WARNING: selected on the test set (unsafe_select_on_test); not a valid test result."
            )
    if "trainable_parameters" in summary:
        lines.append(
            f"  trainable parameters: {summary['trainable_parameters']:,} "
            f"({100 * summary['trainable_share']:.3f}% of the model)"
        )
    return "\n".join(lines)


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (single process, or one rank under torchrun) and return the summary."""
    check_config(cfg)
    ctx = setup(cfg.device)
    say = log if ctx.is_main else (lambda _: None)
    try:
        if cfg.unsafe_select_on_test:
            say("WARNING: unsafe_select_on_test is on: the final stage selects its epoch on TEST accuracy.")
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "tensorboard true needs the tensorboard package: pip install 'selfprompt[tensorboard]'"
            )
        method, settings = method_settings(cfg)  # first: a method's own check says more than the generic one
        check_track(cfg.track, cfg.model.method)
        init = method.initializer(getattr(settings, "init", None)) if method.has_prompts else None
        if init is not None:
            get_initializer(init)
        pristine = create_backbone(cfg.model)
        backbone = backbone_record(cfg, pristine)
        say(backbone_info(pristine).describe())
        splits = build_splits(cfg.data, pristine)
        check_batches(cfg, splits, ctx)
        with claimed_run_dir(cfg, ctx):
            run = prepare_run_dir(cfg, ctx, say)
            return _run_stages(cfg, ctx, run, pristine, splits, backbone, say)
    finally:
        teardown()


def _run_stages(
    cfg: TrainConfig,
    ctx: Context,
    run: RunDir,
    pristine: torch.nn.Module,
    splits: Splits,
    backbone: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    if ctx.is_main:
        run.write_env(environment(cfg, ctx, splits, backbone))
    options = StageOptions.of(cfg.optim, cfg.data, cfg, cfg.track, cfg.eval_every)
    results = []
    for seed in cfg.seeds:
        for name in STAGE_NAMES if cfg.stage == "both" else (cfg.stage,):
            stage = build_stage(name, splits, run, seed, cfg.unsafe_select_on_test)
            if ctx.is_main:
                stage.folder.path.mkdir(parents=True, exist_ok=True)
            barrier()
            results.append(
                train_stage(
                    stage,
                    options,
                    ctx,
                    lambda: build_model(cfg, copy.deepcopy(pristine), len(splits.classes)),
                    preparer(cfg),
                    splits.classes,
                    seed,
                    say,
                )
            )
    summary = {**summarize(results), "backbone": backbone} if ctx.is_main else {}
    if ctx.is_main:
        run.write_summary({"summary": summary, "results": [r.to_json() for r in results]})
        say(format_summary(cfg, summary))
        say(f"Run directory: {run.path}")
    return summary
