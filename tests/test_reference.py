"""Behaviour is what it was before the method registry: bit-identical runs, and old adapters load.

The reference values and adapters were written by ``tests/fixtures/record_reference.py`` with the release
before the change (commit 2b2db73).
"""

import hashlib
import json
from pathlib import Path

import selfprompt
from selfprompt.cli import main
from selfprompt.data import vtab_mini

import pytest
import torch
from conftest import tiny_vit
from reference_runs import METHODS, TASK, run_args
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference_runs.json").read_text())
KINDS = sorted(p.name for p in (FIXTURES / "adapters_v1").iterdir())


def test_the_reference_covers_the_six_original_methods():
    assert tuple(REFERENCE["methods"]) == METHODS
    assert KINDS == ["full", "linear", "prompt_deep", "prompt_shallow"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab_mini")
    vtab_mini.prepare_task(root, TASK)
    return root / TASK


@pytest.mark.parametrize("method", METHODS)
def test_one_epoch_run_is_bit_identical_to_the_release_before(method, task_dir, tmp_path):
    out = tmp_path / method
    assert main(run_args(method, task_dir, out)) == 0
    expected = REFERENCE["methods"][method]
    result = json.loads((out / "summary.json").read_text())["results"][0]
    assert result["last_test_acc"] == expected["test_acc"]
    tensors = load_file(out / "seed0" / "final" / "adapter" / "adapter.safetensors")
    hashes = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in tensors.items()}
    assert hashes == expected["adapter"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_saved_before_load_with_identical_logits(kind):
    folder = FIXTURES / "adapters_v1" / kind
    expected = torch.load(folder / "expected.pt", weights_only=True)
    model = selfprompt.load_pretrained(folder, tiny_vit()).eval()
    with torch.no_grad():
        assert torch.equal(model(expected["images"]), expected["logits"])
