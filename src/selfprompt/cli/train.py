"""``selfprompt train``, ``init-prompts`` and ``pretrain``: the recipe-driven commands."""

from __future__ import annotations

from selfprompt.apps.init_prompts import init_prompts_command
from selfprompt.cli.command import Command
from selfprompt.cli.common import config_from, config_parser
from selfprompt.config import TrainConfig
from selfprompt.engine.run import run
from selfprompt.pretrain.config import PretrainConfig
from selfprompt.pretrain.run import pretrain

from jsonargparse import ArgumentParser

INIT_EXTRAS = ("--output", "--seed")


def _init_parser() -> ArgumentParser:
    parser = config_parser(
        "selfprompt init-prompts", "Compute a recipe's initial prompts, save and show them.", TrainConfig
    )
    parser.add_argument(
        "--output", type=str, default="prompts.safetensors", help="Where to write the prompts."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation.")
    return parser


COMMANDS = [
    Command(
        "train",
        "Train a method from a recipe plus overrides.",
        lambda: config_parser(
            "selfprompt train",
            "Train under the protocol: tune on val, train on train+val, test once.",
            TrainConfig,
        ),
        lambda args: run(config_from(args, TrainConfig)),
        config=TrainConfig,
    ),
    Command(
        "init-prompts",
        "Compute, cache and show initial prompts.",
        _init_parser,
        lambda args: init_prompts_command(
            config_from(args, TrainConfig, INIT_EXTRAS), args.output, args.seed
        ),
        config=TrainConfig,
        extras=INIT_EXTRAS,
    ),
    Command(
        "pretrain",
        "Pretrain a backbone (MAE or supervised).",
        lambda: config_parser(
            "selfprompt pretrain", "Pretrain a timm ViT: MAE or supervised, resumable.", PretrainConfig
        ),
        lambda args: pretrain(config_from(args, PretrainConfig)),
        config=PretrainConfig,
    ),
]
