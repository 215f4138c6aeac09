"""``selfprompt eval``, ``predict``, ``analyze`` and ``transfer-prompts``: commands on trained runs (the
methods' second stages, ``prune`` and ``condense``, come from the registry: :mod:`selfprompt.cli.methods`).
The apps are imported when a command runs, so building a parser imports no torch."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from selfprompt.cli.command import Command
from selfprompt.cli.common import TRAINED_SOURCE, backbone_argument, check_weights_argument, run_dir_parser
from selfprompt.tta_config import TPTConfig

from jsonargparse import ArgumentParser, Namespace


def _tta(parser: ArgumentParser) -> ArgumentParser:
    parser.add_argument(
        "--tta", type=str | None, default=None, help="Test-time adaptation: tpt (test-time prompt tuning)."
    )
    parser.add_class_arguments(TPTConfig, "tpt", help="TPT's settings (with --tta tpt).")
    return parser


def _tpt(args: Namespace) -> TPTConfig | None:
    """The TPT settings when ``--tta tpt`` (refusing other values, and TPT settings without it)."""
    settings = TPTConfig(**args.tpt.as_dict())
    if args.tta is None:
        if settings != TPTConfig():
            raise ValueError("--tpt.* settings need --tta tpt.")
        return None
    if args.tta != "tpt":
        raise ValueError(f"--tta must be tpt (test-time prompt tuning), got {args.tta!r}.")
    return settings


def _eval_parser() -> ArgumentParser:
    parser = run_dir_parser("selfprompt eval", "Evaluate a trained model on one split.", TRAINED_SOURCE)
    backbone_argument(check_weights_argument(parser))
    parser.add_argument(
        "--split", type=str, default="test", help="The run's split to evaluate: train, val, trainval or test."
    )
    parser.add_argument(
        "--images", type=str | None, default=None,
        help="Evaluate on this folder instead (a subfolder of images per class, named as its classes).",
    )  # fmt: skip
    parser.add_argument(
        "--plot", type=bool, default=False,
        help="Draw the confusion matrix and per-class accuracy (confusion_<split>.png, .csv in the stage).",
    )  # fmt: skip
    return _tta(parser)


def _eval(args: Namespace) -> None:
    from selfprompt.apps.predict import evaluate_run

    scores = evaluate_run(
        args.run_dir,
        args.split,
        args.seed,
        args.stage,
        args.device,
        args.ema,
        _tpt(args),
        plot=args.plot,
        check_weights=args.check_weights,
        images=args.images,
        backbone=args.backbone,
    )
    print(json.dumps(scores, indent=2))


def _predict_parser() -> ArgumentParser:
    parser = run_dir_parser("selfprompt predict", "Classify images with a trained model.", TRAINED_SOURCE)
    backbone_argument(check_weights_argument(parser))
    parser.add_argument("inputs", nargs="+", type=str, help="Image files or folders of images.")
    parser.add_argument(
        "--output", type=str | None, default=None, help="Write a .csv or .json (default: stdout)."
    )
    parser.add_argument("--topk", type=int, default=1, help="Classes reported per image.")
    parser.add_argument(
        "--grid", type=str | None, default=None,
        help="Also draw the first 48 images with their top class into this .png (captions in .plot.json).",
    )  # fmt: skip
    return _tta(parser)


def _predict(args: Namespace) -> None:
    from selfprompt.apps.predict import predict_run

    if args.output is not None and not args.output.endswith((".csv", ".json")):
        raise ValueError(f"--output must end in .csv or .json, got {args.output}")
    tpt = _tpt(args)
    started = time.perf_counter()
    if args.grid is not None and not args.grid.endswith(".png"):
        raise ValueError(f"--grid must name a .png file, got {args.grid}")
    rows = predict_run(
        args.run_dir, args.inputs, args.seed, args.stage, args.device, args.ema, args.topk, tpt=tpt,
        grid=args.grid, check_weights=args.check_weights, backbone=args.backbone,
    )  # fmt: skip
    if tpt is not None:
        print(f"TPT: {(time.perf_counter() - started) / len(rows):.3f} s per image", file=sys.stderr)
    write_predictions(rows, args.output)
    failed = [row for row in rows if row.get("error")]
    for row in failed:
        print(f"selfprompt predict: {row['error']}", file=sys.stderr)
    if failed:
        raise ValueError(
            f"{len(failed)} of {len(rows)} images could not be read (the error column says why); the others "
            f"were predicted."
        )


def write_predictions(rows: list[dict[str, Any]], output: str | None) -> None:
    """CSV to stdout (no ``output``) or to a ``.csv`` file, or JSON to a ``.json`` file."""
    if output is None or output.endswith(".csv"):
        stream = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115
        writer = csv.DictWriter(stream, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
        if output:
            stream.close()
    else:
        Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    if output:
        print(f"Wrote {len(rows)} predictions to {output}")


def _analyze_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt analyze", description="Plot the prompt/patch-token statistics a run tracked."
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=str, help="Run directories trained with --track.every N (two: overlaid)."
    )
    parser.add_argument(
        "--output", type=str | None, default=None, help="Where the PNGs go (default: RUN_DIR/analysis)."
    )
    parser.add_argument("--seed", type=int | None, default=None, help="Which seed (default: the first).")
    parser.add_argument(
        "--stage", type=str | None, default=None, help="final or tune (default: final, else tune)."
    )
    return parser


def _analyze(args: Namespace) -> None:
    from selfprompt.apps.analyze import analyze

    for path in analyze(args.run_dirs, args.output, args.seed, args.stage):
        print(f"Wrote {path}")


def _transfer_parser() -> ArgumentParser:
    from selfprompt.apps.transfer_prompts import COMBINE  # its --combine choices (the module imports torch)

    parser = ArgumentParser(
        prog="selfprompt transfer-prompts",
        description="A prompts file from trained prompts of other tasks on the same backbone, for a run that "
        "starts from them (--prompt.file FILE).",
    )
    parser.add_argument("sources", nargs="+", type=str, help="Run folders, adapter folders or prompts files.")
    parser.add_argument("--output", type=str, required=True, help="The prompts file to write (.safetensors).")
    parser.add_argument(
        "--combine", type=str, default="mean", help=f"Several sources: {' or '.join(COMBINE)} (see the docs)."
    )
    parser.add_argument(
        "--num_prompts", type=int | None, default=None, help="Prompts per layer (default: the sources')."
    )
    parser.add_argument(
        "--layers", type=int | None, default=None, help="Prompted layers kept (default: the first source's)."
    )
    parser.add_argument(
        "--seed", type=int | None, default=None, help="A run folder's seed (default: its first)."
    )
    parser.add_argument(
        "--stage", type=str | None, default=None, help="A run folder's stage (default: final, else tune)."
    )
    return parser


def _transfer(args: Namespace) -> None:
    from selfprompt.apps.transfer_prompts import transfer_prompts

    transfer_prompts(
        args.sources, args.output, args.combine, args.num_prompts, args.layers, args.seed, args.stage
    )


COMMANDS = [
    Command("eval", "Evaluate a trained run on a split.", _eval_parser, _eval),
    Command("predict", "Classify images: class and probability per image.", _predict_parser, _predict),
    Command(
        "analyze",
        "Plots of NMI, inertia, similarity and norms per layer over training.",
        _analyze_parser,
        _analyze,
    ),
    Command(
        "transfer-prompts",
        "Initial prompts from runs of other tasks (PPT-style transfer), for --prompt.file.",
        _transfer_parser,
        _transfer,
    ),
]
