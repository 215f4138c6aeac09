"""The top-level API: every method's model class is importable from ``selfprompt``, every ``selfprompt.X`` a
message or docstring names exists, and ``print_trainable_parameters`` speaks peft's format."""

import re
import subprocess
import sys
from pathlib import Path

import selfprompt as sp
from selfprompt.config import TrainConfig
from selfprompt.engine.build import build_model
from selfprompt.methods import method_names, model_classes

import pytest
from conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
# where users read names: the package (messages, docstrings), the README, docs/, benchmarks/ and scripts/
READ = [*(ROOT / "src").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
        *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]  # fmt: skip


def test_every_registered_model_class_is_exported_at_top_level():
    for name, cls in model_classes().items():
        assert getattr(sp, name) is cls, name
        assert name in sp.__all__


def test_every_selfprompt_name_the_source_mentions_exists():
    named = {
        (path.relative_to(ROOT), match)
        for path in READ
        for match in re.findall(r"\b(?:selfprompt|sp)\.([A-Z]\w*)", path.read_text())
    }
    assert named, "the pattern found nothing: it no longer matches how the text names classes"
    missing = sorted(f"{path}: selfprompt.{name}" for path, name in named if not hasattr(sp, name))
    assert not missing


def test_the_wrong_class_message_names_a_class_that_exists(tmp_path):
    from selfprompt.methods.lora import LoRA

    LoRA(tiny_vit(), 3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"selfprompt\.LoRA\.from_pretrained") as error:
        sp.PromptedViT.from_pretrained(tmp_path, tiny_vit())
    name = re.search(r"selfprompt\.(\w+)\.from_pretrained", str(error.value)).group(1)
    assert getattr(sp, name).from_pretrained(tmp_path, tiny_vit()).__class__.__name__ == "LoRA"


@pytest.mark.slow
def test_importing_selfprompt_does_not_import_peft():
    code = "import sys, selfprompt; assert 'peft' not in sys.modules, 'peft imported'; selfprompt.LoRA"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "pc"])
def test_print_trainable_parameters_in_pefts_format(method, capsys):
    cfg = TrainConfig()
    cfg.model.method = method
    model = build_model(cfg, tiny_vit(), 10)
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    pattern = r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})"
    match = re.fullmatch(pattern, line)
    assert match, line
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert trainable == model.num_adapter_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)


def test_every_name_the_benchmarks_and_scripts_import_from_selfprompt_exists():
    """The benchmarks are run by hand: an import that a move broke shows here, not at the user's."""
    import ast
    import importlib

    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("benchmarks/*.py"), *root.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfprompt"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"
                    ), f"{path.name}: from {node.module} import {alias.name}"
