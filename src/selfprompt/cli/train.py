"""``selfprompt train``, ``init-prompts``, ``meta-prompts`` and ``pretrain``: the recipe-driven commands.

Their configs (and so the method registry and torch) are imported when a parser is built or a command runs,
not with this module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from selfprompt.cli.command import Command
from selfprompt.cli.common import UsageError, config_from, config_parser, train_config

from jsonargparse import ArgumentParser, Namespace

INIT_EXTRAS = ("--output", "--seed")
META_EXTRAS = ("--sources", "--output", "--iterations", "--inner_steps", "--meta_lr", "--seed")


def _pretrain_config() -> type:
    from selfprompt.pretrain.config import PretrainConfig

    return PretrainConfig


def _train_parser() -> ArgumentParser:
    return config_parser(
        "selfprompt train",
        "Train under the protocol: tune on val, train on train+val, test once.",
        train_config(),
    )


def _train(args: Namespace) -> None:
    from selfprompt.engine.run import run

    run(config_from(args, train_config()))


def _init_parser() -> ArgumentParser:
    parser = config_parser(
        "selfprompt init-prompts", "Compute a recipe's initial prompts, save and show them.", train_config()
    )
    parser.add_argument(
        "--output", type=str, default="prompts.safetensors", help="Where to write the prompts."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation.")
    return parser


def _init(args: Namespace) -> None:
    from selfprompt.apps.init_prompts import init_prompts_command

    init_prompts_command(config_from(args, train_config(), INIT_EXTRAS), args.output, args.seed)


def _meta_parser() -> ArgumentParser:
    parser = config_parser(
        "selfprompt meta-prompts",
        "Meta-learn a recipe's initial prompts across source tasks (Reptile) into a prompts file for "
        "--prompt.file. The recipe's data settings apply to every source; data.root is each source's.",
        train_config(),
    )
    parser.add_argument("--sources", type=list[str], required=True, help="The source tasks' data roots.")
    parser.add_argument("--output", type=str, required=True, help="Where to write the prompts.")
    parser.add_argument("--iterations", type=int, default=200, help="Reptile iterations (one task each).")
    parser.add_argument("--inner_steps", type=int, default=5, help="Training steps per iteration.")
    parser.add_argument(
        "--meta_lr", type=float, default=1.0, help="Reptile's step size, decayed linearly to 0."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial draw, order and batches.")
    return parser


def own_images(given: dict[str, str]) -> dict[str, Any] | None:
    """``selfprompt train`` with no recipe, no ``data.layout`` and no ``data.task``, on a ``data.root`` that
    holds ``train/``: the method's recipe for a small dataset of one's own, with the splits found there
    (:func:`selfprompt.apps.own_images.own_recipe`), announced in one line; None otherwise."""
    from selfprompt.apps.own_images import PHOTO_BACKBONE, own_recipe
    from selfprompt.config import ModelConfig
    from selfprompt.data.own_folder import find_splits, is_image_folder
    from selfprompt.methods import method_names

    root = given.get("--data.root")
    if not root or {"--data.layout", "--data.task"} & set(given):
        return None
    folder = Path(root).expanduser()
    if not is_image_folder(folder):
        if folder.is_dir() and not any(folder.glob("*.txt")):  # no split lists either: say how to lay it out
            try:
                find_splits(folder)
            except (OSError, ValueError) as error:
                raise UsageError(str(error)) from None
        return None
    method = given.get("--model.method", ModelConfig.method)
    if method not in method_names():
        return None  # the parser names the known ones
    try:
        recipe, splits = own_recipe(root, method)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    backbone = given.get("--model.backbone", recipe["model"]["backbone"])
    hint = (
        f" (ships with selfprompt, needs no network; for photos: --model.backbone {PHOTO_BACKBONE})"
        if backbone == recipe["model"]["backbone"]
        else ""
    )
    print(
        f"{root}: one's own images, {splits}; {method}'s recipe for a small dataset, stage "
        f"{given.get('--stage', recipe['stage'])}, backbone {backbone}{hint}",
        file=sys.stderr,  # beside the notes on the command line; stdout stays --print_config's
    )
    return recipe


def _meta(args: Namespace) -> None:
    from selfprompt.apps.meta_prompts import meta_prompts

    meta_prompts(
        config_from(args, train_config(), META_EXTRAS),
        args.sources,
        args.output,
        args.iterations,
        args.inner_steps,
        args.meta_lr,
        args.seed,
    )


def _pretrain_parser() -> ArgumentParser:
    return config_parser(
        "selfprompt pretrain", "Pretrain a timm ViT: MAE or supervised, resumable.", _pretrain_config()
    )


def _pretrain(args: Namespace) -> None:
    from selfprompt.pretrain.run import pretrain

    pretrain(config_from(args, _pretrain_config()))


COMMANDS = [
    Command(
        "train",
        "Train a method from a recipe plus overrides.",
        _train_parser,
        _train,
        config=train_config,
        default_recipe=own_images,
    ),
    Command(
        "init-prompts",
        "Compute, cache and show initial prompts.",
        _init_parser,
        _init,
        config=train_config,
        extras=INIT_EXTRAS,
    ),
    Command(
        "meta-prompts",
        "Meta-learn initial prompts across source tasks (Reptile), for --prompt.file.",
        _meta_parser,
        _meta,
        config=train_config,
        extras=META_EXTRAS,
    ),
    Command(
        "pretrain",
        "Pretrain a backbone (MAE or supervised).",
        _pretrain_parser,
        _pretrain,
        config=_pretrain_config,
    ),
]
