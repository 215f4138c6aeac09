"""The engine options (engine/speed.py): compile, bf16 backbone, checkpointing, device-resident data."""

import json

import selfprompt as sp
from selfprompt.config import ConfigError, RunOptions, TrainConfig, check_config
from selfprompt.engine import run
from selfprompt.engine.distributed import Context
from selfprompt.engine.lifecycle import changed_fields, config_dict
from selfprompt.engine.loop import autocast, training_loader
from selfprompt.engine.speed import ResidentLoader, engine_record, hold_frozen_in_bf16
from selfprompt.pretrain.config import PretrainConfig, check_pretrain_config

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import adapter, make_dataset, tiny_config
from torch.utils.data import TensorDataset

CPU = Context(0, 1, torch.device("cpu"))


def prompted(seed: int = 0) -> sp.PromptedViT:
    torch.manual_seed(seed)
    return sp.PromptedViT(tiny_vit(seed), num_classes=5, num_prompts=4, deep=True)


def logits_and_grads(model, net, images, labels):
    model.zero_grad(set_to_none=True)
    logits = net(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.adapter_parameters().items()}


def batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])


def test_checkpointed_blocks_give_the_same_gradients():
    images, labels = batch()
    model = prompted().train()
    expected = logits_and_grads(model, model, images, labels)
    model.checkpoint_blocks = True
    logits, grads = logits_and_grads(model, model, images, labels)
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # inductor compiles forward and backward: about 30 s of CPU
def test_compiled_and_eager_give_the_same_logits_and_gradients():
    """Inductor fuses and reorders float32 sums: equal within rtol 1e-4, atol 1e-5."""
    images, labels = batch()
    model = prompted().train()
    expected = logits_and_grads(model, model, images, labels)
    logits, grads = logits_and_grads(model, torch.compile(model), images, labels)
    torch.testing.assert_close(logits, expected[0], rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_backbone_keeps_trainable_parameters_fp32_and_logits_close():
    """Under bf16 autocast, weights held in bf16 change nothing but the first rounding: the logits match
    the fp32 backbone's within 2e-2 (absolute, logits of order 1) and the gradients within 5% of their
    largest value."""
    images, labels = batch()
    reference = prompted().train()
    model = prompted().train()
    with autocast(CPU, "bf16"):
        expected = logits_and_grads(reference, reference, images, labels)
    assert hold_frozen_in_bf16(model) > 0
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters().values())
    assert model.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    with autocast(CPU, "bf16"):
        logits, grads = logits_and_grads(model, model, images, labels)
    torch.testing.assert_close(logits.float(), expected[0].float(), rtol=0, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        scale = expected[1][name].abs().max().item()
        torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=0.05 * scale, msg=name)


def test_device_resident_set_gives_the_loaders_batches():
    dataset = TensorDataset(torch.randn(22, 3, 8, 8), torch.arange(22))  # 2 dropped each epoch
    _, loader, _ = training_loader(dataset, 4, 1, 0, CPU, seed=5, what="x")
    resident = ResidentLoader(loader, CPU.device)
    for epoch in (1, 2, 3):
        loader.sampler.set_epoch(epoch)
        expected = list(loader)
        got = list(resident)
        assert bool(resident.cached.all()) == (epoch > 1)  # the 2 dropped in epoch 1 are read in epoch 2
        assert len(got) == len(expected) == 5
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_engine_options_are_checked_before_any_folder(tmp_path):
    bad = {
        "backbone_dtype": ("bf16", "--precision bf16"),
        "device_data": (True, "--data.augment none or --device_data false"),
        "compile": ("yes", "compile must be true or false"),
    }
    for name, (value, fix) in bad.items():
        cfg = tiny_config(
            tmp_path, tmp_path / "out", precision="fp32", **{name: value, "data.augment": "crop-flip"}
        )
        with pytest.raises(ConfigError, match=fix.replace("-", r"\-").replace(".", r"\.")):
            check_config(cfg)
        assert not (tmp_path / "out").exists()


def test_old_run_folders_resume_and_speed_options_may_change():
    saved = config_dict(TrainConfig())
    for name in ("compile", "fused_adamw", "tf32", "backbone_dtype", "checkpointing", "device_data"):
        del saved[name]  # a config written before these options
    defaults = config_dict(TrainConfig())
    assert changed_fields(saved, defaults, defaults) == []
    faster = config_dict(TrainConfig(compile=True, checkpointing=True, device_data=True, fused_adamw=False))
    assert changed_fields(saved, faster, defaults) == []
    assert changed_fields(saved, config_dict(TrainConfig(backbone_dtype="bf16")), defaults) == [
        "backbone_dtype"
    ]


def test_engine_record_on_cpu():
    record = engine_record(RunOptions(compile=True, precision="fp32"), CPU)
    assert record == {
        "compile": "default",
        "fused_adamw": False,
        "tf32": False,
        "autocast": "off",
        "backbone_dtype": "fp32",
        "checkpointing": False,
        "device_data": False,
    }


def test_a_run_with_resident_data_and_checkpointing_trains_the_same_adapter(tmp_path):
    data = make_dataset(tmp_path / "data")
    exact = {"stage": "tune", "precision": "fp32"}
    run(tiny_config(data, tmp_path / "plain", **exact), log=lambda _: None)
    fast = {"device_data": True, "checkpointing": True}
    run(tiny_config(data, tmp_path / "fast", **exact, **fast), log=lambda _: None)
    for key, value in adapter(tmp_path / "plain", "tune").items():
        torch.testing.assert_close(adapter(tmp_path / "fast", "tune")[key], value, rtol=0, atol=1e-6)
    engine = json.loads((tmp_path / "fast" / "env.json").read_text())["engine"]
    assert engine["device_data"] and engine["checkpointing"] and engine["compile"] is None


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("device_data", True, "cannot re-draw"),
        ("checkpointing", True, "not pretraining"),
        ("backbone_dtype", "bf16", "not pretraining"),
    ],
)
def test_pretraining_refuses_the_options_it_cannot_use(name, value, message):
    cfg = PretrainConfig(precision="bf16", **{name: value})
    with pytest.raises(ConfigError, match=message):
        check_pretrain_config(cfg)
