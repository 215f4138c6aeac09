"""``selfprompt bench`` and ``selfprompt demo`` (their apps imported when a parser is built or a command
runs)."""

from __future__ import annotations

from selfprompt.cli.command import Command

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace


def _bench_parser() -> ArgumentParser:
    from selfprompt.apps.bench import BenchConfig
    from selfprompt.data import registry

    parser = ArgumentParser(prog="selfprompt bench", description="The VTAB-mini grid, resumable.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of bench settings.")
    parser.add_class_arguments(BenchConfig, nested_key=None, fail_untyped=True)
    parser._option_string_actions["--benchmark"].help = f"{registry.spelled()}."
    return parser


def _bench(args: Namespace) -> None:
    from selfprompt.apps.bench import BenchConfig, bench

    d = args.as_dict()
    d.pop("config", None)
    d.pop("__path__", None)
    bench(BenchConfig(**d))


def _demo_parser() -> ArgumentParser:
    from selfprompt.apps.demo import DEMO_EPOCHS, DEMO_TASK

    parser = ArgumentParser(
        prog="selfprompt demo", description="linear vs VPT-deep vs SPT-deep, offline, on CPU."
    )
    parser.add_argument("--output_dir", type=str | None, default=None, help="Default: runs/demo-<date-time>.")
    parser.add_argument(
        "--task", type=str, default=DEMO_TASK, help="The VTAB-mini task (default: the rule in the README)."
    )
    parser.add_argument(
        "--epochs", type=int, default=DEMO_EPOCHS, help="Training epochs (the recipes train 10)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of every run.")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N.")
    return parser


def _demo(args: Namespace) -> None:
    from selfprompt.apps.demo import demo
    from selfprompt.data import vtab_mini

    if args.task not in vtab_mini.TASKS:
        raise ValueError(f"Unknown VTAB-mini task {args.task!r}; tasks: {list(vtab_mini.TASKS)}.")
    demo(args.output_dir, args.task, args.epochs, args.seed, args.device)


COMMANDS = [
    Command(
        "bench",
        "Run methods x backbones x tasks x seeds on VTAB-mini, VTAB-1k or FGVC.",
        _bench_parser,
        _bench,
    ),
    Command(
        "demo",
        "The offline demo (under 5 minutes on 2 cores): linear, VPT-deep, SPT-deep.",
        _demo_parser,
        _demo,
    ),
]
