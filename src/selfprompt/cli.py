"""The ``selfprompt`` command: train, eval, predict, analyze, init-prompts, pretrain, zoo, backbone, bench,
demo, data."""

from __future__ import annotations

import csv
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from selfprompt.bench import BenchConfig
from selfprompt.config import TrainConfig, flatten
from selfprompt.data.check import check_root
from selfprompt.pretrain.config import PretrainConfig

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

RECIPE_SUFFIXES = (".yaml", ".yml")
CONFIG_COMMANDS = ("train", "init-prompts", "pretrain")


def _train_parser(prog: str, description: str, config_class: type = TrainConfig) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML recipe (may also come first, bare)."
    )
    parser.add_class_arguments(config_class, nested_key=None, fail_untyped=True)
    return parser


def _run_dir_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dir", type=str, help="A run directory written by `selfprompt train`.")
    parser.add_argument(
        "--seed", type=int | None, default=None, help="Which seed's model (default: the first)."
    )
    parser.add_argument("--stage", type=str, default="final", help="Which stage's model: final or tune.")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument(
        "--ema", type=bool, default=False, help="Use the EMA weights (runs with optim.ema_decay)."
    )
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="selfprompt", description="Visual prompt tuning (VPT, SPT) for timm ViTs.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand(
        "train",
        _train_parser(
            "selfprompt train", "Train under the protocol: tune on val, train on train+val, test once."
        ),
        help="Train a method from a recipe plus overrides.",
    )
    evaluate = _run_dir_parser("selfprompt eval", "Evaluate a trained run on one split.")
    evaluate.add_argument(
        "--split", type=str, default="test", help="The split to evaluate (a data split name)."
    )
    commands.add_subcommand("eval", evaluate, help="Evaluate a trained run on a split.")
    predict = _run_dir_parser("selfprompt predict", "Classify images with a trained run.")
    predict.add_argument("inputs", nargs="+", type=str, help="Image files or folders of images.")
    predict.add_argument(
        "--output", type=str | None, default=None, help="Write a .csv or .json (default: stdout)."
    )
    predict.add_argument("--topk", type=int, default=1, help="Classes reported per image.")
    commands.add_subcommand("predict", predict, help="Classify images: class and probability per image.")
    analyze = ArgumentParser(
        prog="selfprompt analyze", description="Plot the prompt/patch-token statistics a run tracked."
    )
    analyze.add_argument(
        "run_dirs", nargs="+", type=str, help="Run directories trained with --track.every N (two: overlaid)."
    )
    analyze.add_argument(
        "--output", type=str | None, default=None, help="Where the PNGs go (default: RUN_DIR/analysis)."
    )
    analyze.add_argument("--seed", type=int | None, default=None, help="Which seed (default: the first).")
    analyze.add_argument(
        "--stage", type=str | None, default=None, help="final or tune (default: final, else tune)."
    )
    commands.add_subcommand(
        "analyze", analyze, help="Plots of NMI, inertia, similarity and norms per layer over training."
    )
    init = _train_parser("selfprompt init-prompts", "Compute a recipe's initial prompts, save and show them.")
    init.add_argument("--output", type=str, default="prompts.safetensors", help="Where to write the prompts.")
    init.add_argument("--seed", type=int, default=0, help="Seed of the initialisation.")
    commands.add_subcommand("init-prompts", init, help="Compute, cache and show initial prompts.")
    pretrain = _train_parser(
        "selfprompt pretrain", "Pretrain a timm ViT: MAE or supervised, resumable.", PretrainConfig
    )
    commands.add_subcommand("pretrain", pretrain, help="Pretrain a backbone (MAE or supervised).")
    zoo = ArgumentParser(prog="selfprompt zoo", description="selfprompt's pretrained backbones.")
    commands.add_subcommand("zoo", zoo, help="The offline model zoo: list, verify, export.")
    _add_zoo_actions(zoo)
    bench = ArgumentParser(prog="selfprompt bench", description="The VTAB-mini grid, resumable.")
    bench.add_argument("--config", action=ActionConfigFile, help="A YAML file of bench settings.")
    bench.add_class_arguments(BenchConfig, nested_key=None, fail_untyped=True)
    commands.add_subcommand("bench", bench, help="Run methods x backbones x tasks x seeds on VTAB-mini.")
    demo = ArgumentParser(
        prog="selfprompt demo", description="linear vs VPT-deep vs SPT-deep, offline, on CPU."
    )
    demo.add_argument("--output_dir", type=str | None, default=None, help="Default: runs/demo-<date-time>.")
    demo.add_argument("--task", type=str, default="clevr_count", help="The VTAB-mini task.")
    demo.add_argument("--epochs", type=int | None, default=None, help="Default: the recipes' (10).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of every run.")
    demo.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N.")
    commands.add_subcommand("demo", demo, help="The 3-minute offline demo: linear, VPT-deep, SPT-deep.")
    backbone = ArgumentParser(
        prog="selfprompt backbone",
        description="Load a backbone as `train` would and report where it came from.",
    )
    backbone.add_argument("--backbone", type=str | None, default=None, help="timm name (null: infer it).")
    backbone.add_argument("--checkpoint", type=str | None, default=None, help="A weights file, any layout.")
    backbone.add_argument(
        "--backbone_kwargs", type=dict, default={}, help="More timm.create_model arguments."
    )
    commands.add_subcommand(
        "backbone", backbone, help="Check a backbone or weights file: layout, licence, load."
    )
    data = ArgumentParser(prog="selfprompt data", description="Benchmarks built offline.")
    commands.add_subcommand("data", data, help="Prepare or check VTAB-mini.")
    _add_data_actions(data)
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


def _add_zoo_actions(parser: ArgumentParser) -> None:
    actions = parser.add_subcommands(dest="action")
    actions.add_subcommand("list", ArgumentParser(), help="The zoo's names, files and SHA-256.")
    verify = ArgumentParser()
    verify.add_argument("names", nargs="*", type=str, help="Names to check (default: all).")
    actions.add_subcommand("verify", verify, help="Check the shipped weights against their SHA-256.")
    export = ArgumentParser()
    export.add_argument("run_dir", type=str, help="A finished `selfprompt pretrain` run directory.")
    export.add_argument("--name", type=str, required=True, help="The zoo name, architecture.tag.")
    export.add_argument(
        "--weights_dir", type=str | None, default=None, help="Where to write (default: the package's)."
    )
    export.add_argument("--note", type=str, default="", help="A sentence for the model card.")
    actions.add_subcommand("export", export, help="Ship a pretraining run as fp16 weights + model card.")


def check_field_names(parser: ArgumentParser, argv: list[str]) -> None:
    """Refuse unknown options and recipe fields, suggesting the closest known name."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if "--config" in argv[:-1]:
        recipe = Path(argv[argv.index("--config") + 1])
        if recipe.is_file():
            data = yaml.safe_load(recipe.read_text()) or {}
            unknown += [f"--{k}" for k in flatten(data) if f"--{k}" not in known]
    for option in unknown:
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0][2:]}?" if close else "; see --help for every field."
        parser.error(f"unknown config field {option[2:]!r}{hint}")


def _normalise_argv(argv: list[str]) -> list[str]:
    """``selfprompt train recipe.yaml ...`` means ``selfprompt train --config recipe.yaml ...``."""
    if len(argv) >= 2 and argv[0] in CONFIG_COMMANDS and argv[1].endswith(RECIPE_SUFFIXES):
        return [argv[0], "--config", *argv[1:]]
    return argv


def train_config(ns: Namespace, config_class: type = TrainConfig) -> Any:
    d = ns.as_dict()
    for key in ("config", "output", "__path__") + (("seed",) if config_class is TrainConfig else ()):
        d.pop(key, None)
    return config_class.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if argv and argv[0] in CONFIG_COMMANDS:
        check_field_names(parser._subcommands_action._name_parser_map[argv[0]], argv[1:])
    ns = parser.parse_args(argv)
    try:
        _dispatch(ns.command, ns[ns.command])
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"selfprompt {ns.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _dispatch(command: str, args: Namespace) -> None:
    if command == "train":
        from selfprompt.engine.run import run

        run(train_config(args))
    elif command == "eval":
        from selfprompt.predict import evaluate_run

        scores = evaluate_run(args.run_dir, args.split, args.seed, args.stage, args.device, args.ema)
        print(json.dumps(scores, indent=2))
    elif command == "predict":
        from selfprompt.predict import predict_run

        if args.output is not None and not args.output.endswith((".csv", ".json")):
            raise ValueError(f"--output must end in .csv or .json, got {args.output}")
        rows = predict_run(args.run_dir, args.inputs, args.seed, args.stage, args.device, args.ema, args.topk)
        _write_predictions(rows, args.output)
    elif command == "analyze":
        from selfprompt.analysis.plots import analyze

        for path in analyze(args.run_dirs, args.output, args.seed, args.stage):
            print(f"Wrote {path}")
    elif command == "init-prompts":
        from selfprompt.predict import init_prompts_command

        init_prompts_command(train_config(args), args.output, args.seed)
    elif command == "pretrain":
        from selfprompt.pretrain.run import pretrain

        pretrain(train_config(args, PretrainConfig))
    elif command == "backbone":
        from selfprompt.backbones import backbone_info, create_backbone
        from selfprompt.build import preprocessing
        from selfprompt.config import DataConfig

        model = create_backbone(args.backbone, args.checkpoint, **args.backbone_kwargs)
        info = backbone_info(model)
        print(info.describe())
        print(json.dumps({**info.as_dict(), "preprocessing": preprocessing(DataConfig(), model)}, indent=2))
    elif command == "zoo":
        _zoo(args.action, args[args.action])
    elif command == "data":
        _data(args.action, args[args.action])
    elif command == "demo":
        from selfprompt.demo import demo

        if args.task not in vtab_mini_tasks():
            raise ValueError(f"Unknown VTAB-mini task {args.task!r}; tasks: {vtab_mini_tasks()}.")
        demo(args.output_dir, args.task, args.epochs, args.seed, args.device)
    elif command == "bench":
        from selfprompt.bench import bench

        d = args.as_dict()
        d.pop("config", None)
        d.pop("__path__", None)
        bench(BenchConfig(**d))


def vtab_mini_tasks() -> list[str]:
    from selfprompt.data.vtab_mini import TASKS

    return list(TASKS)


def _data(action: str, args: Namespace) -> None:
    from selfprompt.data import registry

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
    from selfprompt.data import registry

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
    from selfprompt.data import fgvc, vtab, vtab_mini

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


def _zoo(action: str, args: Namespace) -> None:
    from selfprompt import zoo

    if action == "list":
        for name, entry in zoo.registry().items():
            print(
                f"{name}  {entry['parameters']:,} parameters  {entry['bytes']:,} B  sha256 {entry['sha256']}"
            )
    elif action == "verify":
        for name in args.names or zoo.available():
            zoo.verify(name)
            print(f"{name}: ok ({zoo.weights_file(name)})")
    else:
        card = zoo.export(args.run_dir, args.name, args.weights_dir, args.note)
        print(f"Wrote {card.with_suffix('.safetensors')} and its model card {card}")


def _write_predictions(rows: list[dict[str, Any]], output: str | None) -> None:
    if output is None or output.endswith(".csv"):
        stream = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        if output:
            stream.close()
    else:
        Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    if output:
        print(f"Wrote {len(rows)} predictions to {output}")


if __name__ == "__main__":
    sys.exit(main())
