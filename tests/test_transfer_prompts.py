"""Transferred and meta-learned prompt initialisations: exact reproduction, combination rules, refusals."""

from selfprompt.apps.meta_prompts import meta_prompts
from selfprompt.apps.transfer_prompts import combine_prompts, transfer_prompts
from selfprompt.cli import main
from selfprompt.data import write_image_folder
from selfprompt.engine import run
from selfprompt.engine.build import build_model, create_backbone, preparer
from selfprompt.init import init_prompts
from selfprompt.methods.prompt import prompts_file_metadata

import pytest
import torch
from engine_helpers import adapter, make_dataset, tiny_config
from safetensors.torch import load_file


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished tiny spt-deep runs on different data (3 and 4 classes), and their data roots."""
    root = tmp_path_factory.mktemp("transfer")
    other = write_image_folder(root / "b", num_classes=4, per_class={"train": 8, "val": 4, "test": 4}, seed=1)
    data = [make_dataset(root / "a"), other]
    runs = []
    for k, d in enumerate(data):
        run(tiny_config(d, root / f"run{k}", stage="tune", **{"optim.epochs": 1}), log=quiet)
        runs.append(root / f"run{k}")
    return runs, data


def test_one_source_is_reproduced_exactly_and_a_run_starts_from_it(trained, tmp_path):
    runs, data = trained
    source = adapter(runs[0], "tune")["prompts"]
    for combine in ("mean", "concat"):
        out = tmp_path / f"{combine}.safetensors"
        transfer_prompts([runs[0]], out, combine)
        assert torch.equal(load_file(out)["prompts"], source)
    assert prompts_file_metadata(out)["signature"]["embed_dim"] == 32
    cfg = tiny_config(data[0], tmp_path / "target", **{"prompt.file": str(out)})
    model = build_model(cfg, create_backbone(cfg.model), 3)
    preparer(cfg)(model, None, 0)
    assert torch.equal(model.prompts.detach(), source)


def test_several_sources_are_averaged_or_interleaved(trained, tmp_path):
    runs, _ = trained
    a, b = (adapter(r, "tune")["prompts"] for r in runs)
    transfer_prompts(runs, tmp_path / "mean.safetensors", "mean")
    torch.testing.assert_close(load_file(tmp_path / "mean.safetensors")["prompts"], (a + b) / 2)
    # the CLI, with the concat rule cut to 3 prompts of 2 layers: a0 b0 a1
    cli = ["transfer-prompts", *map(str, runs), "--stage", "tune"]  # the command line, in this process
    out = tmp_path / "concat.safetensors"
    cli += ["--output", str(out), "--combine", "concat", "--num_prompts", "3"]
    assert main(cli) == 0
    assert torch.equal(load_file(out)["prompts"], torch.stack([a[:, 0], b[:, 0], a[:, 1]], dim=1))


def test_combination_rules_on_tensors():
    s1, s2 = torch.randn(3, 4, 8), torch.randn(2, 6, 8)
    assert torch.equal(combine_prompts([s1], combine="concat"), s1)
    assert combine_prompts([s1, s2], layers=2, combine="concat").shape == (2, 10, 8)
    assert torch.equal(combine_prompts([s1, s2], num_prompts=4, layers=1)[0], (s1[0] + s2[0, :4]) / 2)
    assert torch.equal(combine_prompts([s1], layers=1), s1[:1])  # a deep source starts a shallow run
    with pytest.raises(ValueError, match="fewer than 3 prompted layers"):
        combine_prompts([s1, s2])
    with pytest.raises(ValueError, match="mean needs 5 prompts"):
        combine_prompts([s1, s2], num_prompts=5, layers=2)
    with pytest.raises(ValueError, match="different widths"):
        combine_prompts([s1, torch.randn(3, 4, 16)])
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_prompts([s1], combine="sum")


def test_adapters_without_prompts_are_refused(tmp_path):
    data = make_dataset(tmp_path / "data")
    run(tiny_config(data, tmp_path / "linear", "linear", stage="tune", **{"optim.epochs": 1}), log=quiet)
    with pytest.raises(ValueError, match=r"holds no .* prompts"):
        transfer_prompts([tmp_path / "linear"], tmp_path / "p.safetensors")


def test_reptile_is_seeded_starts_from_xavier_and_moves_with_the_sources(trained, tmp_path):
    _, data = trained
    cfg = tiny_config(data[0], tmp_path / "unused")
    kwargs = {"iterations": 4, "inner_steps": 2, "log": quiet}
    still = meta_prompts(cfg, data, tmp_path / "zero.safetensors", meta_lr=0.0, seed=3, **kwargs)
    model = build_model(cfg, create_backbone(cfg.model), 3)
    assert torch.equal(still, init_prompts(model, None, "xavier", seed=3))
    one = meta_prompts(cfg, data, tmp_path / "one.safetensors", seed=3, **kwargs)
    two = meta_prompts(cfg, data, tmp_path / "two.safetensors", seed=3, **kwargs)
    assert torch.equal(one, two) and not torch.allclose(one, still)
    assert torch.equal(load_file(tmp_path / "one.safetensors")["prompts"], one)
    assert prompts_file_metadata(tmp_path / "one.safetensors")["algorithm"] == "reptile"
    with pytest.raises(ValueError, match="has no prompts"):
        meta_prompts(tiny_config(data[0], tmp_path / "x", "linear"), data, tmp_path / "l.safetensors")
