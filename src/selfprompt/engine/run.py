"""The protocol as code: per seed, tune (train -> val) then final (train+val -> test once); a summary."""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfprompt.adapter import TaskInfo
from selfprompt.backbones import backbone_info
from selfprompt.config import TrainConfig, check_config
from selfprompt.data.splits import Splits, build_splits, preprocessing
from selfprompt.engine.build import build_model, create_backbone, head_input, method_settings, preparer
from selfprompt.engine.distributed import Context, barrier, setup, teardown
from selfprompt.engine.lifecycle import claimed_run_dir, prepare_run_dir, run_environment
from selfprompt.engine.loop import check_batch
from selfprompt.engine.result import StageResult, headline_key
from selfprompt.engine.rundir import RunDir
from selfprompt.engine.stage import STAGE_NAMES, EpochObserver, StageOptions, build_stage, train_stage
from selfprompt.engine.tracking import check_track
from selfprompt.init.registry import get_initializer
from selfprompt.methods import Method

import torch


def check_batches(cfg: TrainConfig, splits: Splits, ctx: Context) -> None:
    """Each stage's training split holds at least one optimizer step at the configured batch size."""
    stages = STAGE_NAMES if cfg.stage == "both" else (cfg.stage,)
    for name, dataset in (("tune", splits.train), ("final", splits.trainval)):
        if name in stages:
            what = f"The {name} training split ({'train' if name == 'tune' else 'train+val'})"
            check_batch(len(dataset), cfg.data.batch_size, cfg.optim.accumulate, ctx.world_size, what)


def backbone_record(cfg: TrainConfig, backbone: torch.nn.Module) -> dict[str, Any]:
    """Where the backbone's weights came from, their licence and load report, and the head input and
    preprocessing this run resolved for it."""
    pre = preprocessing(cfg.data, backbone)
    return {
        **backbone_info(backbone).as_dict(),
        "head_input": head_input(cfg.model, backbone),
        "preprocessing": json.loads(json.dumps(pre)),
    }


def run_record(cfg: TrainConfig) -> dict[str, Any]:
    """What every adapter of the run records of it for its model card: method, benchmark, dataset and the
    command that ran it (None when run from Python)."""
    called = Path(sys.argv[0]) if sys.argv else Path()
    # the console script, or python -m selfprompt; not another program calling run()
    cli = called.name == "selfprompt" or (called.name == "__main__.py" and called.parent.name == "selfprompt")
    command = shlex.join(["selfprompt", *sys.argv[1:]]) if cli else None
    dataset = cfg.data.task or (Path(cfg.data.root).name if cfg.data.root else None)
    return {
        "method": cfg.model.method,
        "benchmark": cfg.data.benchmark,
        "dataset": dataset,
        "command": command,
    }


def environment(cfg: TrainConfig, ctx: Context, splits: Splits, backbone: dict[str, Any]) -> dict[str, Any]:
    return {
        **run_environment(ctx, cfg),
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


def run(
    cfg: TrainConfig, log: Callable[[str], None] = print, observe: EpochObserver | None = None
) -> dict[str, Any]:
    """Run ``cfg`` (single process, or one rank under torchrun) and return the summary; ``observe`` sees
    every evaluated epoch (:data:`~selfprompt.engine.stage.EpochObserver`)."""
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
        check_track(cfg.track, method)
        init = method.initializer(getattr(settings, "init", None)) if method.has_prompts else None
        if init is not None:
            get_initializer(init)
        pristine = create_backbone(cfg.model)
        backbone = backbone_record(cfg, pristine)
        say(backbone_info(pristine).describe())
        splits = build_splits(cfg.data, pristine, log=say)
        check_batches(cfg, splits, ctx)
        # a trial build: every rule a model's constructor checks against the backbone (e.g.
        # prompt.deep_layers <= depth, an attention it can act on) is refused before the folder exists
        build_model(cfg, copy.deepcopy(pristine), len(splits.classes), (method, settings))
        with claimed_run_dir(cfg, ctx):
            run = prepare_run_dir(cfg, ctx, say)
            return _run_stages(cfg, (method, settings), ctx, run, pristine, splits, backbone, say, observe)
    finally:
        teardown()


def _run_stages(
    cfg: TrainConfig,
    resolved: tuple[Method, Any],
    ctx: Context,
    run: RunDir,
    pristine: torch.nn.Module,
    splits: Splits,
    backbone: dict[str, Any],
    say: Callable[[str], None],
    observe: EpochObserver | None,
) -> dict[str, Any]:
    """Every seed's stages with the method and settings ``resolved`` once for the run; the summary."""
    if ctx.is_main:
        run.write_env(environment(cfg, ctx, splits, backbone))
    options = StageOptions.of(cfg.optim, cfg.data, cfg, cfg.track, cfg.eval_every)
    task = TaskInfo(splits.classes, backbone["preprocessing"], run_record(cfg))
    prepare = preparer(cfg, resolved)
    results = []
    for seed in cfg.seeds:
        for name in STAGE_NAMES if cfg.stage == "both" else (cfg.stage,):
            stage = build_stage(name, splits, run, seed, cfg.unsafe_select_on_test)
            if ctx.is_main:
                stage.folder.path.mkdir(parents=True, exist_ok=True)
            barrier()
            build = lambda: build_model(cfg, copy.deepcopy(pristine), len(splits.classes), resolved)  # noqa: E731
            trained = train_stage(stage, options, ctx, build, prepare, task, seed, say, observe)
            results.append(trained)
    summary = {**summarize(results), "backbone": backbone} if ctx.is_main else {}
    if ctx.is_main:
        run.write_summary({"summary": summary, "results": [r.to_json() for r in results]})
        say(format_summary(cfg, summary))
        say(f"Run directory: {run.path}")
    return summary
