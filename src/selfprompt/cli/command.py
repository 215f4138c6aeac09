"""A command of the ``selfprompt`` CLI: its parser, its runner and, for recipe-driven ones, its config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonargparse import ArgumentParser, Namespace


@dataclass(frozen=True)
class Command:
    """``selfprompt <name>``.

    Attributes:
        name: The command word.
        help: One line for ``selfprompt --help``, or a function giving it where the line needs an import.
        parser: Builds the command's parser.
        run: Runs the parsed arguments.
        config: For recipe-driven commands, a function giving the config dataclass whose fields are options
            (checked, with moved fields migrated, before parsing), so that the table imports no config;
            None otherwise.
        extras: The options such a command adds beside its config's fields.
        actions: For command groups (``data``, ``zoo``): adds the group's own subcommands to the parser once
            it is attached (jsonargparse builds subcommands level by level).
        default_recipe: For recipe-driven commands, the recipe to start from when the command line names
            none: given its options (``{"--data.root": "DIR", ...}``), a recipe mapping or None (no recipe).
    """

    name: str
    help: str | Callable[[], str]
    parser: Callable[[], ArgumentParser]
    run: Callable[[Namespace], None]
    config: Callable[[], type] | None = None
    extras: tuple[str, ...] = ()
    actions: Callable[[ArgumentParser], None] | None = None
    default_recipe: Callable[[dict[str, str]], dict[str, Any] | None] | None = None
