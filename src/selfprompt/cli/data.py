"""``selfprompt data``: list, prepare and check benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from selfprompt.cli.command import Command
from selfprompt.data import fgvc, registry, vtab, vtab_mini
from selfprompt.data.check import check_root

from jsonargparse import ArgumentParser, Namespace


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="selfprompt data", description="Benchmarks built offline.")
    return parser


def _add_data_actions(parser: ArgumentParser) -> None:
    actions = parser.add_subcommands(dest="action")
    listing = ArgumentParser()
    listing.add_argument(
        "--benchmark", type=str | None, default=None, help="vtab-1k, fgvc or vtab-mini (default: all)."
    )
    actions.add_subcommand("list", listing, help="The tasks selfprompt knows: group, classes, label meaning.")
    prepare = ArgumentParser()
    prepare.add_argument(
        "benchmark", type=Literal["vtab-mini", "vtab-1k", "fgvc"], help="vtab-mini, vtab-1k or fgvc."
    )
    prepare.add_argument(
        "--root", type=str | None, default=None, help="vtab-mini, vtab-1k: the folder to write."
    )
    prepare.add_argument(
        "--tasks",
        type=str | None,
        default=None,
        help="vtab-mini, vtab-1k: comma-separated tasks (default: all).",
    )
    prepare.add_argument(
        "--data_dir", type=str | None, default=None, help="vtab-1k: TensorFlow Datasets' data folder."
    )
    prepare.add_argument(
        "--task", type=str | None, default=None, help="fgvc: cub, nabirds, flowers, dogs or cars."
    )
    prepare.add_argument(
        "--source", type=str | None, default=None, help="fgvc: the extracted official archive's folder."
    )
    prepare.add_argument(
        "--splits",
        type=Literal["official", "vpt"],
        default="official",
        help="fgvc: where train/val come from.",
    )
    prepare.add_argument("--json_dir", type=str | None, default=None, help="fgvc: VPT's JSON split files.")
    prepare.add_argument("--val_fraction", type=float, default=0.1, help="fgvc: seeded val share of train.")
    prepare.add_argument("--seed", type=int, default=0, help="fgvc: seed of the val split.")
    prepare.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="fgvc: where the lists go (default: SOURCE/selfprompt_splits).",
    )
    actions.add_subcommand("prepare", prepare, help="Write a benchmark's list layout (VTAB-1k from TFDS).")
    check = ArgumentParser()
    check.add_argument("root", type=str, help="A benchmark folder (or one task's folder with --tasks NAME).")
    check.add_argument(
        "--benchmark", type=str | None, default=None, help="vtab-1k, fgvc or vtab-mini (default: detected)."
    )
    check.add_argument(
        "--tasks", type=str | None, default=None, help="Comma-separated tasks (default: found)."
    )
    actions.add_subcommand("check", check, help="Check prepared tasks: counts, classes, files, hashes.")


def _data(ns: Namespace) -> None:
    action, args = ns.action, ns[ns.action]
    names = args.tasks.split(",") if getattr(args, "tasks", None) else None
    if action == "list":
        for benchmark in [args.benchmark] if args.benchmark else registry.BENCHMARKS:
            print(f"{benchmark}:")
            for t in registry.tasks(benchmark).values():
                print(f"  {t.name:22} {t.group:12} {t.num_classes:4d} classes  {t.labels}  [{t.folder}/]")
    elif action == "prepare":
        _prepare(args, names)
    else:
        benchmark = args.benchmark or _detect_benchmark(Path(args.root))
        report = check_root(args.root, benchmark, names)
        failed = [name for name, problems in report.items() if problems]
        if failed:
            raise ValueError(f"{len(failed)} of {len(report)} {benchmark} tasks have problems: {failed}.")


def _detect_benchmark(root: Path) -> str:
    index = root / "manifest.json"
    if index.is_file():
        return json.loads(index.read_text()).get("benchmark", "vtab-1k")
    for benchmark in ("vtab-1k", "fgvc"):
        if any((root / t.folder).is_dir() for t in registry.tasks(benchmark).values()):
            return benchmark
    raise FileNotFoundError(
        f"{root} holds no known task folder; pass --benchmark (vtab-1k, fgvc, vtab-mini) and --tasks."
    )


def _prepare(args: Namespace, names: list[str] | None) -> None:
    if args.benchmark == "fgvc":
        if args.task is None or args.source is None:
            raise ValueError("fgvc needs --task NAME and --source DIR (the extracted official archive).")
        written = fgvc.prepare(
            args.task, args.source, splits=args.splits, json_dir=args.json_dir,
            val_fraction=args.val_fraction, seed=args.seed, out=args.out,
        )  # fmt: skip
        print(f"Wrote the split lists of {args.task} into {written}")
        return
    if args.root is None:
        raise ValueError(f"{args.benchmark} needs --root DIR, the folder to write.")
    if args.benchmark == "vtab-mini":
        unknown = sorted(set(names or []) - set(vtab_mini.TASKS))
        if unknown:
            raise ValueError(f"Unknown VTAB-mini tasks {unknown}; tasks: {list(vtab_mini.TASKS)}.")
        print(f"Wrote {vtab_mini.prepare(args.root, names)}")
    else:
        for folder in vtab.prepare(args.root, names, args.data_dir):
            print(f"Wrote {folder}")


COMMANDS = [
    Command(
        "data",
        "List, prepare or check benchmarks (VTAB-1k, FGVC, VTAB-mini).",
        _parser,
        _data,
        actions=_add_data_actions,
    )
]
