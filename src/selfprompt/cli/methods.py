"""The methods' second stages (``selfprompt prune``, ``selfprompt condense``, ...): one command per
:class:`~selfprompt.methods.registry.StageCommand` a method registers, so a method's package holds its whole
life and this module names none of them."""

from __future__ import annotations

from selfprompt.cli.command import Command
from selfprompt.cli.common import run_dir_parser
from selfprompt.engine.trained import scoring_source
from selfprompt.methods import stage_commands
from selfprompt.methods.registry import StageCommand

from jsonargparse import ArgumentParser, Namespace


def _command(stage: StageCommand) -> Command:
    def parser() -> ArgumentParser:
        built = run_dir_parser(f"selfprompt {stage.name}", stage.description)
        stage.arguments(built)
        return built

    def run(args: Namespace) -> None:
        stage.run(args, scoring_source)

    return Command(stage.name, stage.help, parser, run)


COMMANDS = [_command(stage) for stage in stage_commands()]
