"""`selfprompt pretrain`: MAE and supervised pretraining from scratch lower their losses, resume exactly, and
export weights that timm loads by name."""

from __future__ import annotations

import json
from pathlib import Path

import selfprompt  # noqa: F401
from selfprompt.cli import main
from selfprompt.config import OptimConfig
from selfprompt.data import write_image_folder
from selfprompt.engine import setup as training_setup_module
from selfprompt.engine.rundir import RunDir
from selfprompt.engine.state import save_state
from selfprompt.pretrain.config import PretrainConfig, PretrainDataConfig
from selfprompt.pretrain.run import build_pretraining, pretrain, pretrain_param_groups

import pytest
import torch
from safetensors.torch import load_file

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-data")
    return write_image_folder(root, num_classes=3, per_class={"train": 32, "val": 8}, splits=("train", "val"))


def config(root: Path, out: Path, objective: str, epochs: int = 6, **extra) -> PretrainConfig:
    return PretrainConfig(
        objective=objective,
        backbone="vit_mini_patch4_32",
        backbone_kwargs=dict(TINY),
        data=PretrainDataConfig(
            source="folder", root=str(root), eval_split="val", batch_size=16, num_workers=0, min_scale=0.5
        ),
        optim=OptimConfig(lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95), epochs=epochs, warmup_epochs=1),
        output_dir=str(out),
        device="cpu",
        eval_every=1,
        progress=False,
        **extra,
    )


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["mae", "supervised"])
def test_pretraining_from_scratch_lowers_the_loss(folder, tmp_path, objective):
    summary = pretrain(config(folder, tmp_path / objective, objective), log=lambda _: None)
    curve = losses(tmp_path / objective)
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    assert summary["final_train_loss"] == curve[-1]
    weights = load_file(RunDir(tmp_path / objective).encoder)
    assert not any(k.startswith(("head.", "decoder", "mask_token")) for k in weights)
    if objective == "supervised":
        assert summary["final_eval_acc"] > 1 / 3  # above chance on held-out images


def test_an_interrupted_pretraining_resumes_to_the_same_weights(folder, tmp_path, monkeypatch):
    pretrain(config(folder, tmp_path / "whole", "mae", epochs=3), log=lambda _: None)

    def save_then_stop(path, ctx, epoch, *args, **kwargs):
        save_state(path, ctx, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(training_setup_module, "save_state", save_then_stop)  # the checkpoint of the setup
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(folder, tmp_path / "split", "mae", epochs=3), log=lambda _: None)
    monkeypatch.undo()
    assert not (RunDir(tmp_path / "split").encoder).exists()
    with pytest.raises(FileExistsError, match="--resume true"):
        pretrain(config(folder, tmp_path / "split", "mae", epochs=3), log=lambda _: None)
    pretrain(config(folder, tmp_path / "split", "mae", epochs=3, resume=True), log=lambda _: None)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    whole, split = (
        load_file(RunDir(tmp_path / "whole").encoder),
        load_file(RunDir(tmp_path / "split").encoder),
    )
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=0, atol=0)


def test_mae_optimizer_does_not_decay_tokens_norms_and_biases(tmp_path):

    cfg = config(tmp_path, tmp_path / "out", "mae")
    model, _, _ = build_pretraining(cfg)
    decayed, undecayed = pretrain_param_groups(model, cfg.optim.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in undecayed["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "encoder.norm.weight"} <= skipped
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decayed["params"])


def test_pretrain_cli_refuses_an_unknown_field_and_a_missing_fashion_mnist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--optim.lrr", "1"])
    assert "did you mean optim.lr" in capsys.readouterr().err
    code = main(["pretrain", "--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert code == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
