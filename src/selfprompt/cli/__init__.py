"""The ``selfprompt`` command: one module per command group, each contributing to the command table."""

from __future__ import annotations

import sys

from selfprompt.cli import apps, data, runs, serve, train, zoo
from selfprompt.cli.command import Command
from selfprompt.cli.common import UsageError, prepare_config_argv

from jsonargparse import ArgumentParser

COMMANDS: dict[str, Command] = {
    c.name: c for group in (train, runs, apps, zoo, data, serve) for c in group.COMMANDS
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt", description="Visual prompt tuning (VPT, SPT) and PETL for timm ViTs."
    )
    commands = parser.add_subcommands(dest="command")
    for command in COMMANDS.values():
        sub = command.parser()
        commands.add_subcommand(command.name, sub, help=command.help)
        if command.actions is not None:
            command.actions(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None and command.config is not None:
            argv = [argv[0], *prepare_config_argv(argv[1:], command.config, command.extras)]
    except UsageError as error:
        parser.error(str(error))
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command].run(ns[ns.command])
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"selfprompt {ns.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["COMMANDS", "Command", "build_parser", "main"]
