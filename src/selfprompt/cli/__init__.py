"""The ``selfprompt`` command: one module per command group, each contributing to the command table."""

from __future__ import annotations

import errno
import sys
import traceback
from pathlib import Path

from selfprompt.atomic import disk_full_error
from selfprompt.cli import apps, data, hub, methods, runs, serve, sweep, train, zoo
from selfprompt.cli.command import Command
from selfprompt.cli.common import UsageError, prepare_config_argv
from selfprompt.version import __version__

import torch
from jsonargparse import ArgumentParser

COMMANDS: dict[str, Command] = {
    c.name: c for group in (train, sweep, runs, methods, apps, zoo, data, serve, hub) for c in group.COMMANDS
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt", description="Visual prompt tuning (VPT, SPT) and PETL for timm ViTs."
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subcommands(dest="command")
    for command in COMMANDS.values():
        sub = command.parser()
        commands.add_subcommand(command.name, sub, help=command.help)
        if command.actions is not None:
            command.actions(sub)
    return parser


def version_line() -> str:
    """``selfprompt X (torch Y, timm Z, Python W)``."""
    import platform

    import timm

    versions = f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}"
    return f"selfprompt {__version__} ({versions})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None and command.config is not None:
            argv = [
                argv[0],
                *prepare_config_argv(argv[1:], command.config, command.extras, command.default_recipe),
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
    if isinstance(error, torch.OutOfMemoryError):
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


__all__ = ["COMMANDS", "Command", "build_parser", "main", "user_message"]
