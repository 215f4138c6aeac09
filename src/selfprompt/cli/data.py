"""``selfprompt data``: list, prepare and check benchmarks; check and show one's own image folder (the
benchmark registry, which imports torch, is read when the command's parser is built or it runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from selfprompt.cli.command import Command

from jsonargparse import ArgumentParser, Namespace


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="selfprompt data", description="Benchmarks built offline.")
    return parser


# the options of ``data prepare``: (PrepareOptions field, type, default, what it is)
_PREPARE_OPTIONS = (
    ("root", str | None, None, "the folder to write."),
    ("tasks", str | None, None, "comma-separated tasks (default: all)."),
    ("data_dir", str | None, None, "TensorFlow Datasets' data folder."),
    ("task", str | None, None, "the one task to write (see selfprompt data list)."),
    ("source", str | None, None, "the extracted official archive's folder."),
    ("splits", Literal["official", "vpt"], "official", "where train/val come from."),
    ("json_dir", str | None, None, "VPT's JSON split files."),
    ("val_fraction", float, 0.1, "seeded val share of train."),
    ("seed", int, 0, "seed of the val split."),
    ("out", str | None, None, "where the lists go (default: SOURCE/selfprompt_splits)."),
)


def _add_data_actions(parser: ArgumentParser) -> None:
    from selfprompt.data import registry
    from selfprompt.data.own_folder import LAYOUT

    actions = parser.add_subcommands(dest="action")
    listing = ArgumentParser()
    listing.add_argument(
        "--benchmark", type=str | None, default=None, help=f"{registry.spelled()} (default: all)."
    )
    actions.add_subcommand("list", listing, help="The tasks selfprompt knows: group, classes, label meaning.")
    prepare = ArgumentParser()
    prepare.add_argument(
        "benchmark",
        type=Literal[registry.names()],
        help=f"{registry.spelled()}.",  # type: ignore[valid-type]
    )
    for name, kind, default, meaning in _PREPARE_OPTIONS:
        users = [b for b in registry.names() if name in registry.benchmark(b).prepare_options]
        prepare.add_argument(f"--{name}", type=kind, default=default, help=f"{', '.join(users)}: {meaning}")
    actions.add_subcommand("prepare", prepare, help="Write a benchmark's list layout (VTAB-1k from TFDS).")
    check = ArgumentParser()
    check.add_argument(
        "root",
        type=str,
        help=f"A benchmark folder (or one task's folder with --tasks NAME), or one's own images ({LAYOUT}).",
    )
    check.add_argument(
        "--benchmark", type=str | None, default=None, help=f"{registry.spelled()} (default: detected)."
    )
    check.add_argument(
        "--tasks", type=str | None, default=None, help="Comma-separated tasks (default: found)."
    )
    actions.add_subcommand(
        "check", check, help="Check prepared tasks (counts, classes, files, hashes) or one's own images."
    )
    show = ArgumentParser()
    show.add_argument("root", type=str, help=f"One's own image folder ({LAYOUT}).")
    show.add_argument(
        "--output", type=str | None, default=None, help="The PNG (default: <folder name>_images.png)."
    )
    show.add_argument("--per_class", type=int, default=4, help="Images shown per class.")
    show.add_argument("--split", type=str | None, default=None, help="The split shown (default: train).")
    show.add_argument(
        "--backbone",
        type=str | None,
        default=None,
        help="The backbone whose evaluation transform is shown (default: the one selfprompt train picks).",
    )
    actions.add_subcommand(
        "show", show, help="Write a PNG grid of a few images per class, after the evaluation transform."
    )


def _data(ns: Namespace) -> None:
    from selfprompt.data import registry
    from selfprompt.data.check import check_root
    from selfprompt.data.own_folder import check_folder, is_image_folder
    from selfprompt.data.registry import PrepareOptions

    action, args = ns.action, ns[ns.action]
    names = args.tasks.split(",") if getattr(args, "tasks", None) else None
    if action == "list":
        for benchmark in [args.benchmark] if args.benchmark else registry.names():
            print(f"{benchmark}:")
            for t in registry.tasks(benchmark).values():
                print(f"  {t.name:22} {t.group:12} {t.num_classes:4d} classes  {t.labels}  [{t.folder}/]")
    elif action == "prepare":
        options = PrepareOptions(**{name: args[name] for name, *_ in _PREPARE_OPTIONS} | {"tasks": names})
        registry.benchmark(args.benchmark).prepare(options, print)
    elif action == "show":
        _show(args)
    elif args.benchmark is None and names is None and is_image_folder(args.root):
        problems = check_folder(args.root)
        if problems:
            raise ValueError(f"{args.root}: {len(problems)} problem(s), listed above.")
    else:
        benchmark = args.benchmark or _detect_benchmark(Path(args.root))
        report = check_root(args.root, benchmark, names)
        failed = [name for name, problems in report.items() if problems]
        if failed:
            raise ValueError(f"{len(failed)} of {len(report)} {benchmark} tasks have problems: {failed}.")


def _show(args: Namespace) -> None:
    from selfprompt.apps.own_images import own_recipe
    from selfprompt.apps.show_data import show_images
    from selfprompt.config import ModelConfig, TrainConfig

    recipe, _ = own_recipe(args.root, ModelConfig.method)
    cfg = TrainConfig.from_dict(recipe)
    cfg.model.pretrained = False  # the transform needs the backbone's config, not its weights
    if args.backbone is not None:
        cfg.model.backbone = args.backbone
    output = args.output or f"{Path(args.root).resolve().name}_images.png"
    grid = show_images(cfg, output, per_class=args.per_class, split=args.split)
    print(
        f"Wrote {grid.path}: {grid.classes} classes x {grid.per_class} images at {grid.cell}x{grid.cell} "
        f"({grid.size[0]}x{grid.size[1]} pixels), after {cfg.model.backbone}'s evaluation transform"
    )


def _detect_benchmark(root: Path) -> str:
    """The benchmark the root's manifest names, else the first whose task folders are there."""
    from selfprompt.data import registry
    from selfprompt.data.own_folder import LAYOUT

    index = root / "manifest.json"
    named = registry.of_manifest(json.loads(index.read_text())) if index.is_file() else None
    if named is not None:
        return named.name
    for benchmark in registry.names():
        if any((root / t.folder).is_dir() for t in registry.tasks(benchmark).values()):
            return benchmark
    raise FileNotFoundError(
        f"{root} holds no known task folder; pass --benchmark ({', '.join(registry.names())}) and --tasks, "
        f"or, for one's own images, lay them out as {LAYOUT}."
    )


#: the benchmarks ``selfprompt --help`` names: the registry's titles (tests/test_cli_startup.py holds them
#: to it; asking the registry would import every benchmark's module, and torch)
TITLES = ("VTAB-1k", "FGVC", "VTAB-mini")

COMMANDS = [
    Command(
        "data",
        f"List, prepare or check benchmarks ({', '.join(TITLES)}); check or show your own images.",
        _parser,
        _data,
        actions=_add_data_actions,
    )
]
