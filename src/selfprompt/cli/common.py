"""What the commands share: recipe-driven config parsing with checked field names, and run-folder options.

The config helpers import :mod:`selfprompt.config` (the method registry, and so torch) when they run: the
run-folder options and this module's import stay light."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfprompt.safe_yaml import load_yaml

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

RECIPE_SUFFIXES = (".yaml", ".yml")


class UsageError(ValueError):
    """A command line that cannot be parsed: printed with the command's usage, exit status 2."""


def train_config() -> type:
    """:class:`selfprompt.config.TrainConfig`, the config of ``train``, ``sweep``, ``init-prompts`` and
    ``meta-prompts``, imported when a parser or a run needs it."""
    from selfprompt.config import TrainConfig

    return TrainConfig


def config_parser(prog: str, description: str, config_class: type) -> ArgumentParser:
    """A parser of every field of ``config_class`` (``--section.field``); a YAML recipe is ``--config``."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML recipe (may also come first, bare)."
    )
    parser.add_class_arguments(config_class, nested_key=None, fail_untyped=True)
    return parser


def config_fields(config_class: type) -> set[str]:
    """Every option a config class accepts: ``--section.field`` and ``--section`` for each section."""
    from selfprompt.config import flatten

    defaults = json.loads(json.dumps(dataclasses.asdict(config_class())))
    keys = set(flatten(defaults))
    return {f"--{k}" for k in keys} | {f"--{k.split('.')[0]}" for k in keys if "." in k}


def _float_fields(config_class: type, prefix: str = "--") -> set[str]:
    """The options of ``config_class`` that take a number with a fraction (``float``, ``float | None``, a
    tuple of floats), as ``--section.field``."""
    found = set()
    for name, hint in typing.get_type_hints(config_class).items():
        if dataclasses.is_dataclass(hint):
            found |= _float_fields(hint, f"{prefix}{name}.")
        elif _holds_float(hint):
            found.add(f"{prefix}{name}")
    return found


def _holds_float(hint: Any) -> bool:
    return hint is float or any(_holds_float(arg) for arg in typing.get_args(hint))


def _yaml_number(word: str) -> str | None:
    """YAML's spelling (``.inf``, ``-.inf``, ``.nan``) of a non-finite number written as Python or JSON
    write it (``inf``, ``-Infinity``, ``NaN``, ``1e999``), which the parser reads as a float; None for
    anything else."""
    try:
        number = float(word)
    except ValueError:
        return None
    if math.isfinite(number):
        return None
    return ".nan" if math.isnan(number) else "-.inf" if number < 0 else ".inf"


def _yaml_numbers(value: Any) -> Any:
    """``value`` (a float field's value: a number, a string, a list of them) with its non-finite numbers in
    YAML's spelling: the parser then reads them as floats and the config check names the field and its
    range, where it would refuse ``inf`` and ``nan`` with a page of usage."""
    if isinstance(value, list):
        return [_yaml_numbers(v) for v in value]
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        words = [w.strip() for w in value[1:-1].split(",")]
        spelled = [_yaml_numbers(w) for w in words]
        return "[" + ",".join(spelled) + "]" if spelled != words else value
    if isinstance(value, (str, float)):
        return _yaml_number(value) or value
    return value


def _suggest(option: str, known: set[str]) -> str:
    close = difflib.get_close_matches(option, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0][2:]}?" if close else "; see --help for every field."


def given_options(argv: list[str]) -> dict[str, str]:
    """The options of a command line and their values (``--name value`` or ``--name=value``; the last one
    given wins; an option without a value maps to an empty string)."""
    found: dict[str, str] = {}
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            following = argv[index + 1] if index + 1 < len(argv) else ""
            found[name] = value if eq else ("" if following.startswith("--") else following)
    return found


DefaultRecipe = Callable[[dict[str, str]], "dict[str, Any] | None"]


def prepare_config_argv(
    argv: list[str],
    config_class: type,
    extras: tuple[str, ...] = (),
    default_recipe: DefaultRecipe | None = None,
) -> list[str]:
    """A config command's arguments, checked and brought up to date before jsonargparse sees them.

    A bare recipe first means ``--config RECIPE``; the recipe is read here, fields that moved are migrated
    (``model.num_prompts`` -> ``prompt.num_prompts``, also on the command line, with a note) and it is
    passed on as JSON; an unknown field, in the recipe or on the command line, is an error naming the
    closest known one. Without a recipe, ``default_recipe(given_options(argv))`` may give one (``train`` on
    one's own image folder), which the command line then overrides.
    """
    from selfprompt.config import legacy_fields

    if argv and argv[0].endswith(RECIPE_SUFFIXES):
        argv = ["--config", *argv]
    known = config_fields(config_class) | {"--config", "--help", "-h", "--print_config", *extras}
    floats = _float_fields(config_class)
    moved = {f"--{old}": f"--{new}" for old, new in legacy_fields().items()}
    out: list[str] = []
    given = given_options(argv)
    if default_recipe is not None and not {"--config", "--help", "-h"} & set(given):
        recipe = default_recipe(given)
        if recipe is not None:
            out += ["--config", _recipe_json(recipe, "the default recipe", known, floats)]
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, eq, value = arg.partition("=")
        if name == "--config" and index + 1 < len(argv) and not eq:
            recipe = Path(argv[index + 1])
            out += ["--config", _recipe_json(read_recipe(recipe), str(recipe), known, floats)]
            index += 2
            continue
        if name in moved:
            print(f"note: {name[2:]} is now {moved[name][2:]}", file=sys.stderr)
            name = moved[name]
            arg = name + eq + value
        elif name.startswith("--") and name not in known:
            raise UsageError(f"unknown config field {name[2:]!r}{_suggest(name, known)}")
        if name in floats and eq:
            arg = f"{name}={_yaml_numbers(value)}"
        elif name in floats and index + 1 < len(argv) and _yaml_numbers(argv[index + 1]) != argv[index + 1]:
            arg = f"{name}={_yaml_numbers(argv[index + 1])}"  # joined: argparse takes -.inf for an option
            index += 1
        out.append(arg)
        index += 1
    return out


def read_recipe(recipe: Path) -> dict[str, Any]:
    """A YAML recipe as a mapping (bounded YAML: :func:`selfprompt.safe_yaml.load_yaml`); UsageError names
    the file and what is wrong."""
    if not recipe.is_file():
        raise UsageError(f"the recipe {recipe} does not exist.")
    try:
        text = recipe.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"{recipe} is not UTF-8 text ({error}); save it as UTF-8.") from None
    except OSError as error:
        raise UsageError(f"cannot read the recipe {recipe}: {error}") from None
    try:
        data = load_yaml(text, str(recipe))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{recipe} must hold a mapping of config sections (model:, data:, optim:, ...), got a "
            f"{type(data).__name__}."
        )
    return data


def _recipe_json(recipe: dict[str, Any], source: str, known: set[str], floats: set[str]) -> str:
    """A recipe read from ``source`` (its file), migrated and checked, as JSON for the parser."""
    from selfprompt.config import flatten, migrate

    data = migrate(recipe)
    sections = {k.split(".")[0][2:] for k in known if "." in k}
    for key, value in data.items():
        if key in sections and not isinstance(value, dict):
            raise UsageError(
                f"{source}: {key} must be a mapping of its fields (e.g. {key}:\n  field: value), got "
                f"{type(value).__name__} {value!r}."
            )
    for key, value in flatten(data).items():
        if f"--{key}" not in known:
            raise UsageError(f"unknown config field {key!r} in {source}{_suggest(f'--{key}', known)}")
        if f"--{key}" in floats:
            section, _, name = key.rpartition(".")
            (data[section] if section else data)[name] = _yaml_numbers(value)
    return json.dumps(data)


def config_from(ns: Namespace, config_class: type, extras: tuple[str, ...] = ()) -> Any:
    """The config object of a parsed config command (its own extra options left out)."""
    d = ns.as_dict()
    for key in ("config", "__path__", *(e.lstrip("-") for e in extras)):
        d.pop(key, None)
    return config_class.from_dict(d)


def check_weights_argument(parser: ArgumentParser) -> ArgumentParser:
    """``--check_weights``, for the commands that load adapters onto a backbone (eval, predict, serve and
    export)."""
    parser.add_argument(
        "--check_weights",
        type=bool,
        default=True,
        help="Refuse a backbone whose weights are not those the adapter was trained on (false: load anyway).",
    )
    return parser


#: the positional of the commands that read an adapter folder as well as a run (eval, predict)
TRAINED_SOURCE = (
    "A run directory written by `selfprompt train`, or an adapter folder (a run's adapter/ folder, copied "
    "anywhere: it names its classes and preprocessing)."
)


def backbone_argument(parser: ArgumentParser) -> ArgumentParser:
    """``--backbone``, for the commands that rebuild a trained model (eval, predict)."""
    parser.add_argument(
        "--backbone",
        type=str | None,
        default=None,
        help="timm name or weights file (default: the backbone the run or adapter was trained on).",
    )
    return parser


def run_dir_parser(
    prog: str, description: str, what: str = "A run directory written by `selfprompt train`."
) -> ArgumentParser:
    """Options of the commands that use a trained run (``what``: the positional's help): which seed, stage,
    device and weights."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dir", type=str, help=what)
    parser.add_argument(
        "--seed", type=int | None, default=None, help="Which seed's model (default: the first)."
    )
    parser.add_argument("--stage", type=str, default="final", help="Which stage's model: final or tune.")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument(
        "--ema", type=bool, default=False, help="Use the EMA weights (runs with optim.ema_decay)."
    )
    return parser
