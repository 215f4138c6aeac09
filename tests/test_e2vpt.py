"""E2VPT (METHODS.md section 6): VPT-deep visual prompts plus key-value prompts in every block."""

import math

from selfprompt import PromptedViT
from selfprompt.engine.build import method_settings
from selfprompt.methods import get_method
from selfprompt.methods.e2vpt.model import E2VPT
from selfprompt.methods.prompt import PromptRunSettings

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import tiny_config
from prompt_method_checks import (
    assert_rows_are_tokens,
    check_round_trip,
    check_trains_exactly,
    patch_tokens,
    vit_base_count,
)

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_without_key_value_prompts_it_is_vpt_deep(images, backbone):
    e2vpt = E2VPT(tiny_vit(**backbone), num_classes=5, num_prompts=3, kv_length=0).eval()
    vpt = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=3, deep=True).eval()
    with torch.no_grad():
        vpt.prompts.copy_(e2vpt.prompts)
        vpt.head.load_state_dict(e2vpt.head.state_dict())
        assert torch.equal(e2vpt(images), vpt(images))
    assert set(e2vpt.adapter_parameters()) == {"prompts", "head.weight", "head.bias"}


def manual_block(block, x, pk, pv):
    """softmax(Q [P_k; K]^T / sqrt(d)) [P_v; V], written out: queries from the tokens only."""
    attn = block.attn
    b, n, _ = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)).softmax(-1)
    assert weights.shape == (b, attn.num_heads, n, pk.shape[1] + n), "queries unchanged, keys longer"
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(b, n, -1))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("share_kv", [True, False])
def test_key_value_prompts_only_lengthen_the_keys_and_values(share_kv):
    model = E2VPT(tiny_vit(reg_tokens=1), num_classes=5, num_prompts=3, kv_length=4, share_kv=share_kv).eval()
    x = torch.randn(2, 2 + 3 + 64, model.embed_dim)
    with torch.no_grad():
        for index, block in enumerate(model.backbone.blocks):
            pk, pv = model._kv(index)
            x_in = (
                x
                if index == 0
                else torch.cat([x[:, :2], model.prompts[index].expand(2, -1, -1), x[:, 5:]], 1)
            )
            out = model.forward_block(index, block, x)
            assert out.shape == x.shape
            torch.testing.assert_close(out, manual_block(block, x_in, pk, pv))
    assert (pk.data_ptr() == pv.data_ptr()) == share_kv


def test_shapes_and_kaiming_init():
    model = E2VPT(tiny_vit(), num_classes=5, num_prompts=3, kv_length=4)
    assert model.kv_prompts["kv"].shape == (3, 2, 4, 16)  # blocks, heads, L_kv, d_h
    assert model.kv_prompts["kv"].abs().max() <= math.sqrt(6 / (4 * 16))
    assert model.kv_prompts["kv"].std() > 0.5 * math.sqrt(6 / (4 * 16)) / math.sqrt(3)


@pytest.mark.parametrize("share_kv", [True, False])
def test_exactly_the_prompts_and_head_train(images, share_kv):
    model = E2VPT(tiny_vit(), num_classes=5, num_prompts=3, kv_length=2, share_kv=share_kv)
    kv = {"kv_prompts.kv"} if share_kv else {"kv_prompts.key", "kv_prompts.value"}
    check_trains_exactly(model, {"prompts", *kv, "head.weight", "head.bias"}, images)


def test_round_trip(images, tmp_path):
    model = E2VPT(
        tiny_vit(class_token=False, global_pool="avg"), 5, num_prompts=3, kv_length=2, share_kv=False
    )
    reloaded = check_round_trip(model, images, tmp_path, class_token=False, global_pool="avg")
    assert (reloaded.config.kv_length, reloaded.config.share_kv) == (2, False)


def test_vit_base_with_100_classes_unshared():
    """METHODS.md section 6: unshared key and value prompts double the 46,080 (the shared count is in
    test_methods)."""
    assert vit_base_count("e2vpt", share_kv=False) == 92_160 + 2 * 46_080 + 76_900 == 261_220


def test_spt_init_visual_prompts_from_patch_tokens_and_kv_from_keys_and_values(images):
    """Visual prompts of layer l are patch tokens entering block l (SPT-deep); key (value) prompts of block
    l are whole tokens' keys (values) LN1(x) W_k + b_k of that block, split into heads."""
    model = E2VPT(tiny_vit(reg_tokens=2), num_classes=5, num_prompts=3, kv_length=4, share_kv=False)
    method = get_method("e2vpt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    vit, dim = model.backbone, model.embed_dim
    for layer, block in enumerate(vit.blocks):
        assert_rows_are_tokens(model.prompts[layer], patch_tokens(vit, images, layer))
        with torch.no_grad():
            x = torch.cat([vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))])
            for earlier in vit.blocks[:layer]:
                x = earlier(x)
            qkv = block.attn.qkv(block.norm1(x))[:, vit.num_prefix_tokens :]
        for name, part in (("key", 1), ("value", 2)):
            prompts = model.kv_prompts[name][layer].transpose(0, 1).reshape(4, dim)  # (L_kv, H * d_h)
            assert_rows_are_tokens(prompts, qkv[..., part * dim : (part + 1) * dim])


def test_shared_key_value_prompts_refuse_a_token_initializer(tmp_path, images):
    cfg = tiny_config(tmp_path, tmp_path, "e2vpt", **{"prompt.init": "kmeans"})
    with pytest.raises(ValueError, match=r"init='kmeans'.*set e2vpt\.share_kv false"):
        method_settings(cfg)
    cfg.e2vpt.share_kv = False
    method_settings(cfg)
    model, method = E2VPT(tiny_vit(), num_classes=5, num_prompts=3), get_method("e2vpt")
    with pytest.raises(ValueError, match=r"set e2vpt\.share_kv false"):
        method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)


def test_default_init_is_xavier_visual_prompts():
    model, method = E2VPT(tiny_vit(), num_classes=5, num_prompts=3), get_method("e2vpt")
    kv = model.kv_prompts["kv"].clone()
    method.prepare(method, model, PromptRunSettings(), None, 0)
    assert model.prompts.abs().max() <= model.xavier_bound()
    assert torch.equal(model.kv_prompts["kv"], kv), "the key-value prompts keep their kaiming draw"
