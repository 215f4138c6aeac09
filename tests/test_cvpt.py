"""CVPT (METHODS.md section 8): tokens cross-attend to per-block prompts after self-attention."""

import math

from selfprompt.engine.build import method_settings
from selfprompt.methods import get_method
from selfprompt.methods.cvpt import CVPT
from selfprompt.methods.prompt import PromptRunSettings
from selfprompt.model import ViTClassifier

import pytest
import torch
from conftest import FP32_ATOL, tiny_vit
from engine_helpers import tiny_config
from prompt_method_checks import (
    assert_rows_are_tokens,
    check_round_trip,
    check_trains_exactly,
)

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_sequence_length_is_unchanged(images, backbone):
    model = CVPT(tiny_vit(**backbone), num_classes=5, num_prompts=7).eval()
    with torch.no_grad():
        assert model.forward_features(images).shape == model.backbone.forward_features(images).shape


@pytest.mark.parametrize("backbone", BACKBONES)
def test_with_nothing_read_from_the_prompts_it_is_the_backbone(images, backbone):
    """Zero value rows of qkv and a zero proj bias: the cross-attention adds exactly zero, so CVPT is the
    linear probe of that backbone."""
    vit = tiny_vit(**backbone)
    with torch.no_grad():
        for block in vit.blocks:
            dim = block.attn.attn_dim
            block.attn.qkv.weight[2 * dim :].zero_()
            block.attn.qkv.bias[2 * dim :].zero_()
            block.attn.proj.bias.zero_()
    torch.manual_seed(0)
    linear = ViTClassifier(vit, num_classes=5).eval()
    model = CVPT(vit, num_classes=5, num_prompts=7).eval()
    with torch.no_grad():
        model.head.load_state_dict(linear.head.state_dict())
        torch.testing.assert_close(model(images), linear(images), rtol=0, atol=FP32_ATOL)


def test_cross_attention_is_the_written_out_formula():
    """x2 = x1 + proj(softmax((x1 W_q + b_q)(P W_k + b_k)^T / sqrt(d)) (P W_v + b_v)) per head, with x1 the
    self-attention branch's output stream, no LayerNorm on x1 or P, then the MLP branch."""
    model = CVPT(tiny_vit(), num_classes=5, num_prompts=7).eval()
    block, x, prompts = model.backbone.blocks[1], torch.randn(2, 65, model.embed_dim), model.prompts[1]
    attn, heads = block.attn, block.attn.num_heads
    with torch.no_grad():
        x1 = x + attn(block.norm1(x))
        w, b = attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3)
        q = (x1 @ w[0].T + b[0]).reshape(2, 65, heads, -1).transpose(1, 2)
        k = (prompts @ w[1].T + b[1]).reshape(7, heads, -1).transpose(0, 1)
        v = (prompts @ w[2].T + b[2]).reshape(7, heads, -1).transpose(0, 1)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)).softmax(-1)  # (2, H, 65, 7)
        x2 = x1 + attn.proj((weights @ v).transpose(1, 2).reshape(2, 65, -1))
        expected = x2 + block.mlp(block.norm2(x2))
        torch.testing.assert_close(model.forward_block(1, block, x), expected)


def test_the_block_weights_are_shared_not_copied():
    model = CVPT(tiny_vit(), num_classes=5, num_prompts=7)
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in model.backbone.parameters()) + model.prompts.numel() + 5 * 32 + 5
    )


def test_exactly_the_prompts_and_head_train(images):
    model = CVPT(tiny_vit(), num_classes=5, num_prompts=7)
    check_trains_exactly(model, {"prompts", "head.weight", "head.bias"}, images)


def test_round_trip(images, tmp_path):
    model = CVPT(tiny_vit(class_token=False, global_pool="avg"), num_classes=5, num_prompts=7, deep_layers=2)
    reloaded = check_round_trip(model, images, tmp_path, class_token=False, global_pool="avg")
    assert reloaded.prompts.shape == (2, 7, 32)


def test_default_init_is_xavier_over_the_3d_tensor():
    model, method = CVPT(tiny_vit(), num_classes=5, num_prompts=7), get_method("cvpt")
    method.prepare(method, model, PromptRunSettings(), None, 0)
    bound = math.sqrt(6 / ((7 + 3) * 32))  # fan_in = M D, fan_out = L D
    assert model.xavier_bound() == pytest.approx(bound)
    assert bound * 0.9 < model.prompts.abs().max() <= bound


def test_spt_init_builds_prompts_from_the_post_attention_stream(images):
    vit = tiny_vit(reg_tokens=2)
    model, method = CVPT(vit, num_classes=5, num_prompts=4), get_method("cvpt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for layer, block in enumerate(vit.blocks):
            x1 = x + block.attn(block.norm1(x))
            assert_rows_are_tokens(model.prompts[layer], x1[:, vit.num_prefix_tokens :])
            x = block(x)


def test_prompt_statistics_tracking_is_refused_where_blocks_are_computed_from_their_parts(tmp_path):
    """track.every reads block inputs through block pre-hooks: gapt, e2vpt (with key-value prompts) and cvpt
    refuse it before anything runs; vfpt calls the blocks themselves and tracks."""
    for name in ("cvpt", "gapt", "e2vpt"):
        with pytest.raises(ValueError, match=f"{name}.*set track.every 0"):
            method_settings(tiny_config(tmp_path, tmp_path, name, **{"track.every": 1}))
    method_settings(tiny_config(tmp_path, tmp_path, "vfpt", **{"track.every": 1}))
    method_settings(tiny_config(tmp_path, tmp_path, "e2vpt", **{"track.every": 1, "e2vpt.kv_length": 0}))
