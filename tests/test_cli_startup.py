"""What starting up imports: ``import selfprompt`` imports no torch, and the help of the commands whose
options need no part of the library imports none of torch, timm, torchvision, matplotlib, optuna, litserve
(each in a fresh interpreter; a property, not a timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import selfprompt
from selfprompt.cli import COMMANDS, main

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "timm", "torchvision", "matplotlib", "optuna", "litserve")
# commands whose --help reads nothing heavy
LIGHT = ("eval", "predict", "analyze", "serve", "export", "zoo", "backbone", "push")
# commands whose options come from the method registry (TrainConfig's methods and sections, BenchConfig, the
# methods' second stages), the benchmark registry (data) or an app's module (demo, transfer-prompts): their
# parsers import torch; `selfprompt --help` lists the second stages and benchmarks by their listed lines
NEEDS_TORCH = ("train", "init-prompts", "meta-prompts", "pretrain", "sweep", "transfer-prompts", "prune",
               "condense", "bench", "demo", "data")  # fmt: skip


def _run(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter on this checkout; it prints one JSON object as its last line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _help(argv: list[str]) -> dict:
    """``selfprompt ARGV`` through the entry point: its exit status, what it printed, the heavy modules."""
    return _run(
        "import contextlib, io, json, sys\n"
        "from selfprompt.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as exit_:\n"
        "        code = exit_.code\n"
        f"print(json.dumps({{'code': code, 'out': out.getvalue(), "
        f"'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )


def test_every_command_is_either_light_or_known_to_need_torch():
    assert sorted(LIGHT + NEEDS_TORCH) == sorted(COMMANDS)


@pytest.mark.parametrize("command", LIGHT)
def test_a_light_commands_help_imports_nothing_heavy(command):
    shown = _help([command, "--help"])
    assert shown["code"] == 0
    assert shown["out"].startswith("usage: selfprompt") and f" {command} " in shown["out"].splitlines()[0]
    assert shown["heavy"] == []


@pytest.mark.parametrize("command", NEEDS_TORCH)
def test_every_other_commands_help_is_printed(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_the_top_level_help_lists_every_command_and_imports_nothing_heavy(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: selfprompt") and all(name in out for name in COMMANDS)
    shown = _help(["--help"])
    assert (shown["code"], shown["out"], shown["heavy"]) == (0, out, [])


def test_the_listed_lines_are_the_registries():
    """What the top-level help lists without asking the registries (the methods' second stages, the
    benchmarks' titles) is what they hold."""
    from selfprompt.cli import data, methods
    from selfprompt.data import registry
    from selfprompt.methods import stage_commands

    assert {stage.name: stage.help for stage in stage_commands()} == methods.OUTLINE
    assert list(data.TITLES) == registry.titles()


def test_import_selfprompt_imports_no_torch():
    found = _run(
        "import json, sys, selfprompt\n"
        f"print(json.dumps([m for m in {HEAVY!r} + ('selfprompt.model',) if m in sys.modules]))"
    )
    assert found == []


@pytest.mark.slow
def test_the_public_names_resolve_on_first_use_and_the_zoo_and_guard_follow_timm():
    """``import selfprompt`` first, as tests/conftest.py does: timm, imported later, finds the zoo, and the
    torchvision guard ran before torchvision (the start-up hook's order is tests/test_import_order.py's)."""
    found = _run(
        "import json, sys, selfprompt\n"
        "model = selfprompt.ViTClassifier\n"
        "from selfprompt import LoRA\n"
        "import timm\n"
        "timm.create_model('vit_mini_patch4_32.mae_fmnist', pretrained=True, num_classes=0)\n"
        "guarded = 'selfprompt._torchvision_compat' in sys.modules\n"
        "print(json.dumps([model.__module__, LoRA.__module__, guarded, type(timm.__loader__).__name__]))"
    )
    assert found == ["selfprompt.model", "selfprompt.methods.lora", True, "SourceFileLoader"]


@pytest.mark.slow
def test_version_still_names_torch_and_timm():
    shown = _help(["--version"])
    assert shown["code"] == 0
    assert shown["out"].startswith(f"selfprompt {selfprompt.__version__} (torch ")
    assert ", timm " in shown["out"]


def test_a_misspelt_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="ViTClasifier"):
        selfprompt.ViTClasifier  # noqa: B018
    assert set(selfprompt.__all__) <= set(dir(selfprompt))
    assert all(getattr(selfprompt, name) is not None for name in selfprompt.__all__)
