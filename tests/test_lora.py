"""LoRA through peft: starts at the frozen backbone, trains only A/B and the head, merges into a plain timm
ViT with the same logits, round-trips as an adapter, and leaves the backbone it was given untouched."""

import copy

import selfprompt as sp
from selfprompt.config import TrainConfig
from selfprompt.engine.build import method_settings
from selfprompt.engine.lifecycle import config_dict
from selfprompt.methods.lora import LoRA
from selfprompt.model import ViTClassifier

import pytest
import torch
import yaml
from conftest import FP32_ATOL, tiny_vit
from timm.models.vision_transformer import VisionTransformer

pytest.importorskip("peft")

# the timm ViT each pooling merges into: avg normalises tokens then averages, mae averages then normalises
PLAIN = {"token": {}, "avg": {"global_pool": "avg", "fc_norm": False}, "mae": {"global_pool": "avg"}}
BACKBONES = {"cls": {}, "registers_no_cls": {"class_token": False, "reg_tokens": 2, "global_pool": "avg"}}


def perturbed(model):
    """Random values in every adapter tensor (B is zero at init, which would hide a wrong merge)."""
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", BACKBONES)
def test_lora_starts_exactly_at_the_frozen_backbone(kind, images):
    torch.manual_seed(0)
    linear = ViTClassifier(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    torch.manual_seed(0)
    lora = LoRA(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.lora_parameters().items() if "lora_B" in n)
    with torch.no_grad():
        torch.testing.assert_close(lora(images), linear(images), rtol=0, atol=FP32_ATOL)


def test_lora_trains_exactly_its_matrices_and_the_head(images):
    model = LoRA(tiny_vit(), num_classes=5, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"backbone.blocks.{i}.attn.qkv.lora_{m}.default.weight" for i in range(3) for m in "AB"} | {
        "head.weight",
        "head.bias",
    }
    assert trainable == expected == set(model.adapter_parameters())
    assert model.num_adapter_parameters() == 3 * 4 * (32 + 96) + 32 * 5 + 5
    assert model.backbone.blocks[0].attn.fused_attn, "timm's fused attention is kept"
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):  # A's gradient is zero while B is
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), torch.arange(6) % 5).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert not model.backbone.training, "the backbone stays in eval mode"


def test_lora_dropout_follows_the_model_mode_while_the_backbone_stays_in_eval(images):
    model = perturbed(LoRA(tiny_vit(), num_classes=5, dropout=0.5)).train()
    assert not model.backbone.training and model.backbone.blocks[0].attn.qkv.lora_dropout.training
    with torch.no_grad():
        assert not torch.equal(model(images), model(images)), "dropout is active while training"
        model.eval()
        assert torch.equal(model(images), model(images))


@pytest.mark.parametrize("pool", ["token", "avg", "mae"])
def test_merged_lora_is_a_plain_timm_vit_with_the_same_logits(pool, images):
    vit = tiny_vit()
    model = perturbed(LoRA(vit, num_classes=5, targets=["qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], pool=pool))
    model.eval()
    merged = model.merged()
    assert type(merged) is VisionTransformer
    assert not any("lora" in n for n, _ in merged.named_modules())
    plain = tiny_vit(num_classes=5, **PLAIN[pool])
    assert set(dict(merged.named_parameters())) == set(dict(plain.named_parameters()))
    assert (
        sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in vit.parameters()) + 32 * 5 + 5
    )
    assert not merged.training and not any(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        unmerged = model(images)
        assert (merged(images) - unmerged).abs().max() <= 1e-5
        assert torch.equal(model(images), unmerged), "merging works on a copy"


def test_targets_are_anchored_to_the_blocks():
    model = LoRA(tiny_vit(), num_classes=5, rank=2, targets=("qkv", "attn.proj", "fc1", "mlp.fc2"))
    assert model.config.targets == ("qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    adapted = {n.rsplit(".lora_", 1)[0] for n in model.lora_parameters()}
    assert adapted == {
        f"backbone.blocks.{i}.{t}" for i in range(3) for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert isinstance(model.backbone.patch_embed.proj, torch.nn.Conv2d), "patch_embed.proj is not adapted"
    # per block r * (in + out) over qkv, proj, fc1, fc2 of a width-32, mlp-ratio-2 ViT
    assert model.num_adapter_parameters() == 3 * 2 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32)) + 165
    with pytest.raises(ValueError, match=r"bare 'proj' also matches .*patch_embed\.proj.*attn\.proj"):
        LoRA(tiny_vit(), num_classes=5, targets=["proj"])
    with pytest.raises(ValueError, match="unknown target 'head'"):
        LoRA(tiny_vit(), num_classes=5, targets=["head"])


def test_the_backbone_given_is_left_a_plain_timm_vit(images):
    """The engine deep-copies a pristine backbone per stage: building on it must not change it."""
    vit = tiny_vit()
    state = copy.deepcopy(vit.state_dict())
    torch.manual_seed(1)
    first = LoRA(vit, num_classes=5).eval()
    with torch.no_grad():
        at_init = first(images)
    perturbed(first).merged()
    assert type(vit.blocks[0].attn.qkv) is torch.nn.Linear and not hasattr(vit, "peft_config")
    assert vit.state_dict().keys() == state.keys()
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())
    torch.manual_seed(1)
    second = LoRA(copy.deepcopy(vit), num_classes=5).eval()
    assert set(second.adapter_parameters()) == set(first.adapter_parameters()), "no nested LoRA layers"
    with torch.no_grad():
        assert torch.equal(second(images), at_init)


def test_lora_adapter_round_trips(images, tmp_path):
    model = perturbed(LoRA(tiny_vit(), num_classes=5, rank=4, alpha=8.0, dropout=0.0)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter.safetensors").stat().st_size < 10_000  # kilobytes: A, B and the head
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert type(reloaded) is LoRA
    assert (reloaded.config.rank, reloaded.config.alpha, reloaded.config.targets) == (4, 8.0, ("qkv",))
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_a_saved_config_of_another_method_reads_back_with_lora_defaults():
    """config.yaml holds every section; read back, the lora defaults must still count as unset."""
    cfg = TrainConfig()
    cfg.model.method = "linear"
    saved = yaml.safe_load(yaml.safe_dump(config_dict(cfg)))
    assert method_settings(TrainConfig.from_dict(saved))[0].name == "linear"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRA(tiny_vit(), num_classes=5, rank=0)
    with pytest.raises(ValueError, match="train_backbone must be False"):
        LoRA(tiny_vit(), num_classes=5, train_backbone=True)
