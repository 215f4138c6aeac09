"""SSF: at scale 1 and shift 0 the model is the frozen backbone; each op is followed by its affine; only
scales, shifts and head train; re-parameterised, it is a plain timm ViT with the same logits."""

import copy

import selfprompt as sp
from selfprompt.methods.ssf import SSF
from selfprompt.model import ViTClassifier

import pytest
import torch
from conftest import FP32_ATOL, tiny_vit
from timm.models.vision_transformer import VisionTransformer

BACKBONES = {"cls": {}, "registers_no_cls": {"class_token": False, "reg_tokens": 2, "global_pool": "avg"}}
PLAIN = {"token": {}, "avg": {"global_pool": "avg", "fc_norm": False}, "mae": {"global_pool": "avg"}}
OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def perturbed(model):
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", BACKBONES)
def test_ssf_at_identity_is_the_frozen_backbone(kind, images):
    torch.manual_seed(0)
    linear = ViTClassifier(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    torch.manual_seed(0)
    model = SSF(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    scales = torch.cat([p for n, p in model.ssf_parameters().items() if n.endswith("scale")])
    shifts = torch.cat([p for n, p in model.ssf_parameters().items() if n.endswith("shift")])
    assert abs(scales.mean() - 1) < 0.01 and abs(scales.std() - 0.02) < 0.005  # N(1, 0.02^2)
    assert abs(shifts.mean()) < 0.01 and abs(shifts.std() - 0.02) < 0.005  # N(0, 0.02^2)
    model.reset_ssf(std=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), linear(images), rtol=0, atol=FP32_ATOL)


def test_each_op_is_followed_by_its_scale_and_shift():
    model = perturbed(SSF(tiny_vit(), num_classes=5)).eval()
    assert model.ssf_paths == (
        "patch_embed.norm",
        *(f"blocks.{i}.{op}" for i in range(3) for op in OPS),
        "norm",
    )
    wrapper = model.backbone.blocks[0].attn.qkv
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), wrapper.op(x) * wrapper.scale + wrapper.shift)
        assert wrapper.scale.shape == (96,)
    assert model.backbone.blocks[0].attn.fused_attn, "timm's fused attention is kept"
    assert model.backbone.patch_embed.patch_size == (4, 4), "patch_embed keeps its attributes"


def test_ssf_trains_exactly_its_scales_shifts_and_the_head(images):
    vit = tiny_vit()
    state = copy.deepcopy(vit.state_dict())
    model = SSF(vit, num_classes=5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.adapter_parameters())
    assert trainable - {"head.weight", "head.bias"} == {
        f"backbone.{path}.{kind}" for path in model.ssf_paths for kind in ("scale", "shift")
    }
    # per block 2 * (32 + 96 + 32 + 32 + 64 + 32), patch embedding and final norm 2 * 32 each, head 165
    assert model.num_adapter_parameters() == 3 * 2 * 288 + 4 * 32 + 165
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(images), torch.arange(6) % 5).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert not model.backbone.training, "the backbone stays in eval mode"
    assert type(vit.blocks[0].attn.qkv) is torch.nn.Linear, "the backbone given keeps its modules"
    assert vit.state_dict().keys() == state.keys()
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("pool", ["token", "avg", "mae"])
def test_reparameterised_ssf_is_a_plain_timm_vit_with_the_same_logits(pool, images):
    vit = tiny_vit()
    model = perturbed(SSF(vit, num_classes=5, pool=pool)).eval()
    merged = model.merged()
    assert type(merged) is VisionTransformer
    assert not any(
        "ssf" in type(m).__name__.lower() or "ScaleShift" in type(m).__name__ for m in merged.modules()
    )
    assert set(dict(merged.named_parameters())) == set(
        dict(tiny_vit(num_classes=5, **PLAIN[pool]).named_parameters())
    )
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in vit.parameters()) + 165
    with torch.no_grad():
        unmerged = model(images)
        assert (merged(images) - unmerged).abs().max() <= 1e-5
        assert torch.equal(model(images), unmerged), "folding works on a copy"


def test_reparameterisation_adds_a_bias_where_an_op_has_none(images):
    """A qkv without bias (qkv_bias=False) and a patch embedding without one get the shift as their bias."""
    vit = tiny_vit(qkv_bias=False)
    vit.patch_embed.proj.bias = None
    model = perturbed(SSF(vit, num_classes=5)).eval()
    merged = model.merged()
    assert merged.blocks[0].attn.qkv.bias is not None and merged.patch_embed.proj.bias is not None
    with torch.no_grad():
        assert (merged(images) - model(images)).abs().max() <= 1e-5
    assert vit.blocks[0].attn.qkv.bias is None and vit.patch_embed.proj.bias is None


def test_a_patch_embedding_with_its_own_norm_folds_into_that_norm(images):
    vit = tiny_vit(embed_norm_layer="layernorm")
    model = perturbed(SSF(vit, num_classes=5)).eval()
    assert model.backbone.patch_embed.norm.scale.shape == (32,)
    merged = model.merged()
    assert isinstance(merged.patch_embed.norm, torch.nn.LayerNorm)
    with torch.no_grad():
        assert (merged(images) - model(images)).abs().max() <= 1e-5


def test_ssf_adapter_round_trips(images, tmp_path):
    model = perturbed(SSF(tiny_vit(), num_classes=5)).eval()
    model.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert type(reloaded) is SSF
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_a_second_model_on_a_deep_copy_of_the_backbone_starts_alike(images):
    vit = tiny_vit()
    torch.manual_seed(3)
    first = SSF(vit, num_classes=5).eval()
    with torch.no_grad():
        at_init = first(images)
    perturbed(first).merged()
    torch.manual_seed(3)
    second = SSF(copy.deepcopy(vit), num_classes=5).eval()
    assert second.ssf_paths == first.ssf_paths
    with torch.no_grad():
        assert torch.equal(second(images), at_init)


@pytest.mark.parametrize("pool,options", [("mae", {}), ("avg", {"global_pool": "avg"})])
def test_the_official_placement_applies_the_last_scale_and_shift_to_the_tokens_before_pooling(
    pool, options, images
):
    """``tokens``: the norm that follows pooling (``mae``'s norm, or an ``fc_norm``) sees the mean of the
    scaled and shifted tokens; ``after_norm`` (the default) scales and shifts that norm's output."""
    vit = tiny_vit(**options)
    torch.manual_seed(0)
    ours = perturbed(SSF(vit, num_classes=5, pool=pool)).eval()
    torch.manual_seed(0)
    official = SSF(vit, num_classes=5, pool=pool, final_placement="tokens").eval()
    with torch.no_grad():
        for name, param in official.adapter_parameters().items():  # the same values, the last one moved
            param.copy_(
                ours.adapter_parameters()[name.replace("token_ssf", f"backbone.{ours.ssf_paths[-1]}")]
            )
    assert official.ssf_paths == ours.ssf_paths[:-1] and ours.ssf_paths[-1] in ("norm", "fc_norm")
    assert official.num_adapter_parameters() == ours.num_adapter_parameters()
    bb, last = official.backbone, ours.wrappers()[ours.ssf_paths[-1]]
    with torch.no_grad():
        tokens = official.forward_features(images) * last.scale + last.shift
        pooled = tokens[:, official.num_prefix_tokens :].mean(dim=1)
        expected = official.head(bb.fc_norm(bb.norm(pooled)))
        torch.testing.assert_close(official(images), expected, rtol=0, atol=FP32_ATOL)
        assert (official(images) - ours(images)).abs().max() > 1e-3, "the placements differ here"
    with pytest.raises(ValueError, match="no merged form"):
        official.merged()


def test_the_placements_coincide_where_the_final_norm_acts_on_the_tokens(images):
    torch.manual_seed(0)
    ours = SSF(tiny_vit(), num_classes=5, pool="token").eval()
    torch.manual_seed(0)
    official = SSF(tiny_vit(), num_classes=5, pool="token", final_placement="tokens").eval()
    assert official.ssf_paths == ours.ssf_paths and official.token_ssf is None
    with torch.no_grad():
        assert torch.equal(official(images), ours(images))
    with pytest.raises(ValueError, match="final_placement"):
        SSF(tiny_vit(), num_classes=5, final_placement="before_norm")


def test_an_adapter_of_the_official_placement_round_trips(images, tmp_path):
    model = perturbed(SSF(tiny_vit(), num_classes=5, pool="mae", final_placement="tokens")).eval()
    model.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert reloaded.config.final_placement == "tokens" and reloaded.token_ssf is not None
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
