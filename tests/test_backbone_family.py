"""The backbone family functions (selfprompt.backbones.vit, found by backbone_family) against timm's own."""

import itertools

from selfprompt.backbones import BACKBONE_FAMILIES, attention_family, backbone_family, vit
from selfprompt.backbones.family import BackboneFamily

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from timm.layers import Attention
from torch import nn

LAYOUTS = {
    "class token": {},
    "no class token": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1},
    "dynamic size": {"dynamic_img_size": True},
    "qk_norm": {"qk_norm": True},
}


def entering_block_0(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What timm's own forward_features feeds block 0 (a pre-hook)."""
    seen = []
    handle = backbone.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        backbone.forward_features(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_the_prologue_is_what_timm_feeds_block_0(layout, images):
    backbone = tiny_vit(**layout)
    family = backbone_family(backbone)
    with torch.no_grad():
        expected = entering_block_0(backbone, images)
        assert torch.equal(family.prologue(backbone, images), expected)
        patches = family.embed_patches(backbone, images)
        staged = family.pre_blocks(backbone, family.embed_tokens(backbone, patches))
    assert torch.equal(staged, expected)
    assert family.patch_grid(backbone, images, patches) == (8, 8)
    assert expected.shape[1] == backbone.num_prefix_tokens + 64


def test_the_prologue_inserts_tokens_after_the_position_embedding(images):
    backbone = tiny_vit()
    family = backbone_family(backbone)
    extra = torch.randn(1, 3, 32).expand(len(images), -1, -1)
    with torch.no_grad():
        x = family.prologue(backbone, images, insert=lambda t: torch.cat([t[:, :1], extra, t[:, 1:]], dim=1))
        plain = family.prologue(backbone, images)
    assert x.shape[1] == plain.shape[1] + 3
    assert torch.equal(x[:, 1:4], extra) and torch.equal(x[:, 4:], plain[:, 1:])


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_running_the_blocks_from_their_inputs_is_timms_forward_features(layout, images):
    backbone = tiny_vit(**layout)
    family = backbone_family(backbone)
    with torch.no_grad():
        backbone.forward_features(images)  # a first pass, so that both below run warm kernels
        expected = backbone.forward_features(images)
        pairs = list(family.tokens_entering_blocks(backbone, family.prologue(backbone, images)))
        assert [block for block, _ in pairs] == list(backbone.blocks)
        for (block, x), (_, following) in itertools.pairwise(pairs):
            assert torch.equal(block(x), following)
        last_block, last = pairs[-1]
        assert torch.equal(backbone.norm(last_block(last)), expected)


def test_taking_the_first_inputs_runs_only_the_blocks_before_them(images):
    backbone = tiny_vit()
    family = backbone_family(backbone)
    ran = []
    for index, block in enumerate(backbone.blocks):
        block.register_forward_hook(lambda *_args, i=index: ran.append(i))
    entering = family.tokens_entering_blocks(backbone, family.prologue(backbone, images), num_blocks=2)
    assert [b for b, _ in entering] == list(backbone.blocks[:2])
    assert ran == [0]


def attention_module(**options) -> Attention:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, norm_layer=nn.LayerNorm, **options).eval()
    with torch.no_grad():
        for module in attn.modules():
            if isinstance(module, nn.LayerNorm):  # not the identity their defaults would be
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return attn


ATTENTION = {
    "plain": {},
    "qk_norm": {"qk_norm": True},
    "scale_norm": {"scale_norm": True},
    "gated": {"gated": True},
    "all": {"qk_norm": True, "scale_norm": True, "gated": True},
}


@pytest.mark.parametrize("options", ATTENTION.values(), ids=list(ATTENTION))
def test_the_attention_decomposition_is_timms_attention(options):
    attn = attention_module(**options)
    family = attention_family(attn)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(family.attention(attn, x), attn(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_the_attention_decomposition_on_a_tiny_vit(qk_norm, images):
    backbone = tiny_vit(qk_norm=qk_norm)
    family = backbone_family(backbone)
    with torch.no_grad():
        x = family.prologue(backbone, images)
        for block, tokens in family.tokens_entering_blocks(backbone, x):
            h = block.norm1(tokens)
            assert torch.allclose(family.attention(block.attn, h), block.attn(h), atol=1e-6, rtol=0)


def test_the_qkv_parts_are_the_rows_of_the_fused_projection():
    attn = attention_module()
    family = attention_family(attn)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        whole = family.split_heads(attn, family.project(attn, x))
        for part in range(3):
            alone = family.split_heads(attn, family.project(attn, x, part))
            assert alone.shape == (1, 2, 4, 5, 8)
            assert torch.allclose(alone[0], whole[part], atol=1e-6, rtol=0)
        assert family.merge_heads(attn, whole[2]).shape == (2, 5, 32)


def test_an_attention_without_the_optional_parts_is_decomposed_as_older_timm_runs_it():
    attn = attention_module()
    del attn.gate, attn.norm  # older timm releases have neither step
    assert vit.optional_part(attn, "gate") is None and vit.optional_part(attn, "norm") is None
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        q, k, v = vit.split_heads(attn, attn.qkv(x)).unbind(0)
        heads = F.scaled_dot_product_attention(q, k, v)
        expected = attn.proj(heads.transpose(1, 2).reshape(2, 7, 32))
        assert torch.allclose(vit.attention(attn, x), expected, atol=1e-6, rtol=0)


def test_an_unknown_backbone_class_is_refused_naming_the_supported_ones():
    with pytest.raises(TypeError, match=r"supports timm VisionTransformer .*got Sequential"):
        backbone_family(nn.Sequential(nn.Conv2d(3, 8, 3)))
    assert attention_family(nn.MultiheadAttention(8, 2)) is None


def test_every_family_is_a_module_with_every_function():
    assert [f.name for f in BACKBONE_FAMILIES] == ["vit", "eva", "beit", "swin"]
    family = BackboneFamily.of(vit)
    assert family == BACKBONE_FAMILIES[0]
    assert family.prologue is vit.prologue and family.model_class is vit.MODEL_CLASS
    assert backbone_family(tiny_vit()) is BACKBONE_FAMILIES[0]
