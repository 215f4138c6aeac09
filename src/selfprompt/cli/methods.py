"""The methods' second stages (``selfprompt prune``, ``selfprompt condense``, ...): one command per
:class:`~selfprompt.methods.registry.StageCommand` a method registers, so a method's package holds its whole
life and this module names none of them. Asking the registry imports every method (and torch): ``commands``
does it when the CLI needs these commands, not when it is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from selfprompt.cli.command import Command
from selfprompt.cli.common import run_dir_parser

from jsonargparse import ArgumentParser, Namespace

if TYPE_CHECKING:
    from selfprompt.methods.registry import StageCommand


def _command(stage: StageCommand) -> Command:
    def parser() -> ArgumentParser:
        built = run_dir_parser(f"selfprompt {stage.name}", stage.description)
        stage.arguments(built)
        return built

    def run(args: Namespace) -> None:
        from selfprompt.engine.trained import scoring_source

        stage.run(args, scoring_source)

    return Command(stage.name, stage.help, parser, run)


#: ``selfprompt --help``'s line for each second stage the built-in methods register, so that the outline needs
#: no registry (and no torch); tests/test_cli_startup.py holds it to the registry's lines
OUTLINE = {
    "prune": "E2VPT pruning: score an e2vpt run's prompt masks for a pruned, rewound run.",
    "condense": "Prompt Condensation: keep a run's most important prompts for method pc.",
}


def commands() -> list[Command]:
    """A command per second stage the method registry holds."""
    from selfprompt.methods import stage_commands

    return [_command(stage) for stage in stage_commands()]


def __getattr__(name: str) -> list[Command]:
    if name == "COMMANDS":  # the group's commands, as every command group names them
        return commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
