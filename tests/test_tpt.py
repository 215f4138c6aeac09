"""Test-time prompt tuning: plain prediction at zero steps, the adapter untouched, seeded, refused without
prompts, and the CLI."""

import hashlib
import json

from selfprompt import PromptedViT, ViTClassifier
from selfprompt.cli import main
from selfprompt.engine import run
from selfprompt.engine.tta import PromptTuner, TPTConfig

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import make_dataset, tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = PromptedViT(tiny_vit(), 5, num_prompts=3, deep=True)
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)
    return m.eval()


def test_zero_steps_is_plain_prediction(model, images):
    with torch.no_grad():
        plain = model(images)
    tuned = PromptTuner(model, TPTConfig(views=4, steps=0))(images)
    torch.testing.assert_close(tuned, plain, atol=1e-5, rtol=0)


def test_the_adapter_is_restored_after_every_image_and_tuning_moves_the_prediction(model, images):
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TPTConfig(views=8, keep=0.25, steps=2, lr=0.05)
    tuned = PromptTuner(model, cfg, seed=1)(images)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.prompts.grad is None and not model.training
    with torch.no_grad():
        plain = model(images)
    assert (tuned - plain).abs().max() > 1e-3
    torch.testing.assert_close(PromptTuner(model, cfg, seed=1)(images), tuned, atol=0, rtol=0)
    # each image starts from the stored prompts: one image alone gets what it gets within the batch
    torch.testing.assert_close(PromptTuner(model, cfg, seed=1)(images[:1]), tuned[:1], atol=1e-5, rtol=0)


def test_a_step_lowers_the_entropy_of_the_views_it_tunes_on(model, images):
    image = images[0]
    cfg = TPTConfig(views=1, keep=1.0, steps=1, lr=1e-3)
    with torch.no_grad():
        before = model(image[None]).log_softmax(-1)
    after = PromptTuner(model, cfg)(image[None]).log_softmax(-1)
    entropy = lambda logp: -(logp.exp() * logp).sum()  # noqa: E731
    assert entropy(after) < entropy(before)


def test_views_are_the_image_then_crops_of_its_size(model, images):
    views = PromptTuner(model, TPTConfig(views=5), seed=3).views(images[0])
    assert views.shape == (5, *images[0].shape) and torch.equal(views[0], images[0])
    assert not torch.equal(views[1], views[2])


def test_bad_settings_and_models_without_prompts_are_refused():
    with pytest.raises(ValueError, match="keep must be in"):
        TPTConfig(keep=0)
    with pytest.raises(ValueError, match="has none"):
        PromptTuner(ViTClassifier(tiny_vit(), 3))


def test_predict_and_eval_with_tpt_from_the_command_line(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    run(tiny_config(data, tmp_path / "run", stage="tune", **{"optim.epochs": 1}), log=lambda _: None)
    weights = tmp_path / "run" / "seed0" / "tune" / "adapter" / "adapter.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    common = [str(tmp_path / "run"), "--stage", "tune", "--device", "cpu"]
    tpt = ["--tta", "tpt", "--tpt.views", "4", "--tpt.keep", "0.5"]
    capsys.readouterr()
    assert main(["predict", *common, str(data / "test"), *tpt]) == 0  # the command line, in this process
    out = capsys.readouterr()
    assert "s per image" in out.err and len(out.out.strip().splitlines()) == 1 + 24
    assert main(["eval", *common, "--split", "val", *tpt]) == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out)
    assert row["tta"] == "tpt" and row["views"] == 4 and row["seconds_per_image"] > 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert main(["eval", *common, "--tpt.steps", "2"]) != 0
    assert "need --tta tpt" in capsys.readouterr().err
