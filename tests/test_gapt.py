"""GaPT (METHODS.md section 5): gated shallow prompts and per-block attention temperatures."""

import math

from selfprompt import PromptedViT
from selfprompt.methods import get_method
from selfprompt.methods.gapt import GaPT
from selfprompt.methods.prompt import PromptRunSettings
from selfprompt.model import ViTClassifier

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import tiny_config
from prompt_method_checks import (
    assert_rows_are_tokens,
    check_round_trip,
    check_trains_exactly,
    patch_tokens,
)

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


def gapt_and_vpt(deep: bool, gate: float, **backbone):
    """GaPT with every gate logit at ``gate`` and tau = 1, and a PromptedViT with the same prompts (repeated
    per layer when ``deep``) and head."""
    gapt = GaPT(tiny_vit(**backbone), num_classes=5, num_prompts=3).eval()
    vpt = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=3, deep=deep).eval()
    with torch.no_grad():
        gapt.gates.fill_(gate)
        vpt.prompts.copy_(gapt.prompts.expand_as(vpt.prompts))
        vpt.head.load_state_dict(gapt.head.state_dict())
    return gapt, vpt


@pytest.mark.parametrize("backbone", BACKBONES)
def test_open_gates_are_vpt_shallow(images, backbone):
    """g = 1 keeps each block's update of the prompts: VPT-shallow with the same prompts."""
    gapt, vpt = gapt_and_vpt(False, math.inf, **backbone)
    with torch.no_grad():
        torch.testing.assert_close(gapt(images), vpt(images))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_closed_gates_reinsert_the_prompts_before_every_block(images, backbone):
    """g = 0 (theta -> -inf) undoes blocks 0..L-2's updates of the prompts: every block sees the original
    prompts and only the last (ungated) block updates them, i.e. VPT-deep with the one prompt set repeated
    per layer. (VPT-shallow is the open-gate limit above.)"""
    gapt, vpt = gapt_and_vpt(True, -math.inf, **backbone)
    with torch.no_grad():
        torch.testing.assert_close(gapt(images), vpt(images))
        shallow = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=3).eval()
        shallow.prompts.copy_(gapt.prompts)
        shallow.head.load_state_dict(gapt.head.state_dict())
        assert not torch.allclose(gapt(images), shallow(images))


def test_temperature_divides_the_logits_and_is_clamped(images):
    """tau scales the attention logits: tau -> its clamp range bounds, and tau = 1 vs 2 differ exactly as a
    manual softmax(QK^T / (sqrt(d) tau)) V says for one block."""
    model = GaPT(tiny_vit(), num_classes=5, num_prompts=3).eval()
    with torch.no_grad():
        model.temperatures.copy_(torch.tensor([100.0, 1e-4, 2.0]))
        model(images)
    assert model.temperatures.tolist() == pytest.approx([10.0, 0.01, 2.0])
    block, tau = model.backbone.blocks[2], 2.0  # the last block: ungated, so its output is the block's
    attn, x = block.attn, torch.randn(2, 7, model.embed_dim)
    with torch.no_grad():
        out = model.forward_block(2, block, x)
        q, k, v = attn.qkv(block.norm1(x)).reshape(2, 7, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / (math.sqrt(attn.head_dim) * tau)).softmax(-1)
        manual = x + attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, -1))
        manual = manual + block.mlp(block.norm2(manual))
    torch.testing.assert_close(out, manual)


def test_gates_start_at_minus_gate_init_and_one_per_block_but_the_last():
    model = GaPT(tiny_vit(), num_classes=5, num_prompts=3, gate_init=5.0)
    assert model.gates.tolist() == [-5.0, -5.0]
    assert model.temperatures.tolist() == [1.0, 1.0, 1.0]


def test_exactly_prompts_gates_temperatures_and_head_train(images):
    model = GaPT(tiny_vit(), num_classes=5, num_prompts=3)
    check_trains_exactly(model, {"prompts", "gates", "temperatures", "head.weight", "head.bias"}, images)


def test_round_trip(images, tmp_path):
    model = GaPT(tiny_vit(reg_tokens=2), num_classes=5, num_prompts=3, gate_init=4.0)
    reloaded = check_round_trip(model, images, tmp_path, reg_tokens=2)
    assert reloaded.config.gate_init == 4.0


def test_spt_init_builds_the_prompts_from_patch_embedding_tokens(images):
    model = GaPT(tiny_vit(), num_classes=5, num_prompts=4)
    method = get_method("gapt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    assert_rows_are_tokens(model.prompts[0], patch_tokens(model.backbone, images, 0), atol=0)


def test_default_init_is_the_official_uniform_draw():
    model = GaPT(tiny_vit(), num_classes=5, num_prompts=4)
    method = get_method("gapt")
    assert method.initializer(None) == "xavier"
    method.prepare(method, model, PromptRunSettings(), None, 0)
    assert model.prompts.abs().max() <= model.xavier_bound()


def test_settings_are_the_prompt_section_plus_gapt(tmp_path):
    from selfprompt.engine.build import build_model, method_settings

    cfg = tiny_config(tmp_path, tmp_path, "gapt", **{"gapt.gate_init": 3.0, "prompt.dropout": 0.1})
    model = build_model(cfg, tiny_vit(), 3)
    assert (model.config.gate_init, model.config.dropout, model.num_prompts) == (3.0, 0.1, 4)
    with pytest.raises(ValueError, match=r"one shallow prompt set; drop prompt\.deep_layers"):
        method_settings(tiny_config(tmp_path, tmp_path, "gapt", **{"prompt.deep_layers": 2}))
    with pytest.raises(ValueError, match=r"does not read the gapt settings; drop gapt\.gate_init"):
        method_settings(tiny_config(tmp_path, tmp_path, "vpt-deep", **{"gapt.gate_init": 3.0}))
    assert isinstance(model, ViTClassifier)
