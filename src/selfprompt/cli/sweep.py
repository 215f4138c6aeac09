"""``selfprompt sweep``: a recipe's hyperparameter search under the protocol (Optuna, imported when it
runs)."""

from __future__ import annotations

from typing import Any

from selfprompt.cli.command import Command
from selfprompt.cli.common import config_from, config_parser, train_config

from jsonargparse import ArgumentParser, Namespace

EXTRAS = ("--search", "--sampler", "--trials", "--storage", "--final", "--pruner")


def _parser() -> ArgumentParser:
    from selfprompt.apps.sweep import PRUNERS, SAMPLERS

    parser = config_parser(
        "selfprompt sweep",
        "Search a recipe's settings on the validation split, retrain the best on train+val, test once.",
        train_config(),
    )
    parser.add_argument(
        "--search", type=dict[str, list[Any]], required=True,
        help='Fields and values to try, e.g. \'{"optim.lr": [0.1, 0.01], "optim.weight_decay": [0.01, 0]}\'.',
    )  # fmt: skip
    parser.add_argument("--sampler", type=str, default="grid", help=f"One of {SAMPLERS}.")
    parser.add_argument("--trials", type=int | None, default=None, help="tpe: settings to try.")
    parser.add_argument(
        "--storage", type=str | None, default=None,
        help="Optuna storage URL shared by every worker (default: sqlite file study.db in output_dir).",
    )  # fmt: skip
    parser.add_argument("--final", type=bool, default=True, help="Retrain the best and test it once.")
    parser.add_argument(
        "--pruner", type=str, default="none",
        help=f"One of {PRUNERS}: stop trials whose validation accuracy Optuna's pruner finds hopeless.",
    )  # fmt: skip
    return parser


def _sweep(args: Namespace) -> None:
    from selfprompt.apps.sweep import SweepSettings, sweep

    settings = SweepSettings(args.search, args.sampler, args.trials, args.storage, args.final, args.pruner)
    record = sweep(config_from(args, train_config(), EXTRAS), settings)
    best = record.get("best")
    if best is not None:
        print(f"best setting {best['params']}: val acc {100 * best['val_acc']:.2f}% ({record['tie_rule']})")
    else:
        so_far = record.get("best_so_far")
        shown = ""
        if so_far is not None:
            shown = f"; the best so far is {so_far['params']}: val acc {100 * so_far['val_acc']:.2f}%"
        if record["pending"]:
            print(
                f"{record['pending']} trial(s) still running or queued in other workers{shown} (not the "
                f"final choice): the worker that finishes last chooses and runs the final stage, or run this "
                f"same command again once they finish."
            )
        else:
            print(f"the search is not complete (see the trials' states in sweep.json){shown}; no choice.")
    if "final" in record:
        print(f"final (train+val, tested once): test acc {100 * record['final']['test_acc']:.2f}%")


COMMANDS = [Command("sweep", "Hyperparameter search on val, final retrain, one test.", _parser, _sweep,
                    config=train_config, extras=EXTRAS)]  # fmt: skip
