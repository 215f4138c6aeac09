"""The ``selfprompt`` command: one module per command group, each contributing to the command table.

Building a parser imports only what its options need: the group modules import the library inside their
commands' functions, ``main`` builds the chosen command's parser alone, and the methods' second stages (which
need the method registry, and so torch) join the table only when something looks past the CLI's own
commands."""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

from selfprompt.atomic import disk_full_error
from selfprompt.cli import apps, data, hub, methods, runs, serve, sweep, train, zoo
from selfprompt.cli.command import Command
from selfprompt.cli.common import UsageError, prepare_config_argv
from selfprompt.version import __version__

from jsonargparse import ArgumentParser


class CommandTable(MutableMapping[str, Command]):
    """Name -> :class:`Command`, in the groups' order. A group is its list of commands, or a function giving
    it that is called on the first look-up of a name the lists lack, or on the first look at them all."""

    def __init__(self, groups: list[list[Command] | Callable[[], list[Command]]]) -> None:
        self._groups = groups
        self._table = {c.name: c for group in groups if isinstance(group, list) for c in group}
        self._complete = not any(callable(group) for group in groups)

    def _all(self) -> dict[str, Command]:
        if not self._complete:
            listed = [group if isinstance(group, list) else group() for group in self._groups]
            # in the groups' order; a command set here before (a test's stand-in) stays
            self._table = {c.name: c for group in listed for c in group} | self._table
            self._complete = True
        return self._table

    def __getitem__(self, name: str) -> Command:
        return self._table[name] if name in self._table else self._all()[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self._table[name] = command

    def __delitem__(self, name: str) -> None:
        del self._all()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._table or name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def outline(self, lines: dict[str, str]) -> dict[str, str]:
        """Every command's help line by name, in the groups' order, without loading a lazy group: its lines
        come from ``lines`` (name -> line), unless something loaded it already."""
        if self._complete:
            return {name: _line(command) for name, command in self._table.items()}
        outline: dict[str, str] = {}
        for group in self._groups:
            outline |= lines if callable(group) else {c.name: _line(self._table[c.name]) for c in group}
        return outline


def _line(command: Command) -> str:
    return command.help() if callable(command.help) else command.help


COMMANDS = CommandTable(
    [train.COMMANDS, sweep.COMMANDS, runs.COMMANDS, methods.commands, apps.COMMANDS, zoo.COMMANDS,
     data.COMMANDS, serve.COMMANDS, hub.COMMANDS]
)  # fmt: skip


class _Version(argparse._VersionAction):
    """``--version`` (argparse's own action, so usage and help read as before): :func:`version_line`,
    computed when asked for, since it imports torch and timm."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        self.version = version_line()
        super().__call__(parser, namespace, values, option_string)


def build_parser(command: str | None = None, outline: bool = False) -> ArgumentParser:
    """The parser of every command, or of ``command`` alone (what ``main`` builds for a known command);
    ``outline``: every command with an empty parser, all that ``selfprompt --help`` shows."""
    parser = ArgumentParser(
        prog="selfprompt", description="Visual prompt tuning (VPT, SPT) and PETL for timm ViTs."
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subcommands(dest="command")
    if outline:  # the methods' second stages by their listed lines: no registry, no torch
        for name, line in COMMANDS.outline(methods.OUTLINE).items():
            commands.add_subcommand(name, ArgumentParser(), help=line)
        return parser
    for chosen in [COMMANDS[command]] if command is not None else COMMANDS.values():
        sub = chosen.parser()
        commands.add_subcommand(chosen.name, sub, help=_line(chosen))
        if chosen.actions is not None:
            chosen.actions(sub)
    return parser


def version_line() -> str:
    """``selfprompt X (torch Y, timm Z, Python W)``."""
    import platform

    import timm
    import torch

    versions = f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}"
    return f"selfprompt {__version__} ({versions})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv and not argv[0].startswith("-") else None
    parser = build_parser(command.name) if command is not None else build_parser(outline=True)
    try:
        if command is not None and command.config is not None:
            argv = [
                argv[0],
                *prepare_config_argv(argv[1:], command.config(), command.extras, command.default_recipe),
            ]
    except UsageError as error:
        parser.error(str(error))
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command].run(ns[ns.command])
    except KeyboardInterrupt:
        print(f"selfprompt {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = user_message(error)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        print(f"selfprompt {ns.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


_PACKAGE = Path(__file__).resolve().parents[1]  # src/selfprompt
# what the library raises for bad input, files, settings or environment, wherever it comes from
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
# what the library also raises on purpose; from inside another package (torch, timm) it signals a bug
RAISED_ON_PURPOSE = (RuntimeError, TypeError)


def _raised_by_selfprompt(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is selfprompt's own code (a ``raise`` there)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def user_message(error: Exception) -> str | None:
    """The one-line message the CLI prints for ``error``, or None for a bug (shown with its traceback).

    The line: ValueError, OSError, ImportError and FloatingPointError say what is wrong with an input, a
    file, a setting or the machine (the library converts the KeyErrors, pickle, safetensors and YAML errors
    of bad files into ValueErrors naming the file); RuntimeError and TypeError are messages when selfprompt
    raised them itself, and so is running out of memory. Anything else (KeyError, IndexError,
    AttributeError, a RuntimeError from inside torch, ...) is a bug.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = disk_full_error(error.filename or "a file", error)
        return str(full if full is not None else error)
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        first = str(error).strip().splitlines()[0]
        return (
            f"out of memory ({first}); lower --data.batch_size (raise --optim.accumulate to keep the global "
            f"batch) or --data.eval_batch_size."
        )
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, RAISED_ON_PURPOSE) and _raised_by_selfprompt(error):
        return str(error)
    return None


__all__ = ["COMMANDS", "Command", "CommandTable", "build_parser", "main", "user_message"]
