"""``selfprompt zoo`` and ``selfprompt backbone``: the shipped backbones and any backbone or weights file (the
library imported when a command runs)."""

from __future__ import annotations

import json

from selfprompt.cli.command import Command

from jsonargparse import ArgumentParser, Namespace


def _zoo_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="selfprompt zoo", description="selfprompt's pretrained backbones.")
    return parser


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


def _zoo(ns: Namespace) -> None:
    from selfprompt import zoo
    from selfprompt.apps.zoo_export import export

    action, args = ns.action, ns[ns.action]
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
        card = export(args.run_dir, args.name, args.weights_dir, args.note)
        print(f"Wrote {card.with_suffix('.safetensors')} and its model card {card}")


def _backbone_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt backbone",
        description="Load a backbone as `train` would and report where it came from.",
    )
    parser.add_argument("--backbone", type=str | None, default=None, help="timm name (null: infer it).")
    parser.add_argument("--checkpoint", type=str | None, default=None, help="A weights file, any layout.")
    parser.add_argument("--backbone_kwargs", type=dict, default={}, help="More timm.create_model arguments.")
    return parser


def _backbone(args: Namespace) -> None:
    from selfprompt.backbones import backbone_info, create_backbone
    from selfprompt.data.config import DataConfig
    from selfprompt.data.splits import preprocessing

    model = create_backbone(args.backbone, args.checkpoint, **args.backbone_kwargs)
    info = backbone_info(model)
    print(info.describe())
    print(json.dumps({**info.as_dict(), "preprocessing": preprocessing(DataConfig(), model)}, indent=2))


COMMANDS = [
    Command(
        "zoo", "The offline model zoo: list, verify, export.", _zoo_parser, _zoo, actions=_add_zoo_actions
    ),
    Command(
        "backbone", "Check a backbone or weights file: layout, licence, load.", _backbone_parser, _backbone
    ),
]
