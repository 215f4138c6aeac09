"""Token layout, deep replacement and pooling, checked against timm's own VisionTransformer."""

from selfprompt import PromptedViT, ViTClassifier

import pytest
import torch
from conftest import TINY, tiny_vit
from timm.models.vision_transformer import VisionTransformer

M = 5
CASES = {
    "cls-token": dict(),
    "no-cls-avg": dict(class_token=False, global_pool="avg"),
    "registers-no-embed-class": dict(reg_tokens=2, no_embed_class=True),
    "registers-embed-class": dict(reg_tokens=1),
    "pre-norm": dict(pre_norm=True),
    "no-pos-embed": dict(pos_embed="none"),
    "dynamic-size": dict(dynamic_img_size=True),
}


def registers_reference(model: PromptedViT, overrides: dict) -> VisionTransformer:
    """timm's ViT with M extra register tokens holding the prompts, zero position embedding at them."""
    bb = model.backbone
    ref = VisionTransformer(
        **{**TINY, **overrides, "reg_tokens": bb.num_reg_tokens + M, "num_classes": model.config.num_classes}
    ).eval()
    state = {k: v for k, v in bb.state_dict().items() if k not in ("reg_token", "pos_embed")}
    state["head.weight"], state["head.bias"] = model.head.weight, model.head.bias
    prompts = model.prompts.detach()
    state["reg_token"] = prompts if bb.reg_token is None else torch.cat([bb.reg_token, prompts], dim=1)
    if bb.pos_embed is not None:
        pos = bb.pos_embed
        if not bb.no_embed_class:
            p = bb.num_prefix_tokens
            pos = torch.cat([pos[:, :p], torch.zeros(1, M, pos.shape[-1]), pos[:, p:]], dim=1)
        state["pos_embed"] = pos
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"pos_embed"}
    return ref


@pytest.mark.parametrize("case", CASES)
def test_shallow_equals_timm_with_register_prompts(case, images):
    overrides = CASES[case]
    model = PromptedViT(tiny_vit(**overrides), num_classes=7, num_prompts=M)
    torch.nn.init.normal_(model.prompts)
    ref = registers_reference(model, overrides)
    x = torch.randn(2, 3, 40, 48) if overrides.get("dynamic_img_size") else images
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mae_pool_averages_prompts_and_patches_then_final_norm(images):
    """The official SPT MAE head: mean over everything after the class token, then the encoder norm."""
    model = PromptedViT(tiny_vit(), num_classes=7, num_prompts=M, pool="mae")
    torch.nn.init.normal_(model.prompts)
    ref = registers_reference(model, {})
    with torch.no_grad():
        tokens = ref.blocks(ref.norm_pre(ref._pos_embed(ref.patch_embed(images))))
        expected = ref.head(ref.norm(tokens[:, 1:].mean(dim=1)))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_avg_pool_excludes_prompts(images):
    model = PromptedViT(tiny_vit(), num_classes=7, num_prompts=M, pool="avg")
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model.pool(tokens)
        patches_only = model.backbone.norm(tokens)[:, 1 + M :].mean(dim=1)
        with_prompts = model.backbone.norm(tokens)[:, 1:].mean(dim=1)
    torch.testing.assert_close(pooled, patches_only)
    assert not torch.allclose(pooled, with_prompts)


def block_inputs(model: PromptedViT, images: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for b in model.backbone.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "overrides", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")]
)
@pytest.mark.parametrize("deep_layers", [None, 2])
def test_deep_prompts_replace_previous_prompt_outputs(overrides, deep_layers, images):
    bb = tiny_vit(**overrides)
    model = PromptedViT(bb, num_classes=3, num_prompts=M, deep=True, deep_layers=deep_layers)
    torch.nn.init.normal_(model.prompts)
    k = deep_layers or len(bb.blocks)
    assert model.prompts.shape == (k, M, bb.embed_dim)
    p = bb.num_prefix_tokens
    inputs = block_inputs(model, images)
    with torch.no_grad():
        embedded = bb._pos_embed(bb.patch_embed(images))
        outputs = [bb.blocks[i](inputs[i]) for i in range(len(inputs))]
    # prefix and patch tokens enter block 0 exactly as in the backbone
    torch.testing.assert_close(inputs[0][:, :p], embedded[:, :p], rtol=0, atol=0)
    torch.testing.assert_close(inputs[0][:, p + M :], embedded[:, p:], rtol=0, atol=0)
    for i, x in enumerate(inputs):
        assert x.shape[1] == p + M + bb.patch_embed.num_patches
        prompt_slot = x[:, p : p + M]
        if i < k:
            torch.testing.assert_close(prompt_slot, model.prompts[i].expand_as(prompt_slot), rtol=0, atol=0)
        else:  # past the prompted layers the prompt outputs travel on, as in shallow
            torch.testing.assert_close(prompt_slot, outputs[i - 1][:, p : p + M], rtol=0, atol=0)
        if i > 0:  # prefix and patch outputs of the previous block are never replaced
            torch.testing.assert_close(x[:, :p], outputs[i - 1][:, :p], rtol=0, atol=0)
            torch.testing.assert_close(x[:, p + M :], outputs[i - 1][:, p + M :], rtol=0, atol=0)


def test_deep_with_one_layer_equals_shallow(images):
    deep = PromptedViT(tiny_vit(), num_classes=3, num_prompts=M, deep=True, deep_layers=1)
    shallow = PromptedViT(tiny_vit(), num_classes=3, num_prompts=M)
    shallow.load_state_dict(deep.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(deep(images), shallow(images), rtol=0, atol=0)


def test_prompt_dropout_only_while_training(images):
    model = PromptedViT(tiny_vit(), num_classes=3, num_prompts=M, deep=True, dropout=0.5)
    torch.nn.init.normal_(model.prompts)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(images), model(images))
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(images), model.eval()(images))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prompts=0), "num_prompts"),
        (dict(num_prompts=-3), "num_prompts"),
        (dict(num_prompts=5, num_classes=0), "num_classes"),
        (dict(num_prompts=5, deep_layers=2), "deep=True"),
        (dict(num_prompts=5, deep=True, deep_layers=9), r"deep_layers must be in \[1, 3\]"),
        (dict(num_prompts=5, pool="cls"), "pool must be one of"),
        (dict(num_prompts=5, dropout=1.0), r"prompt\.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptedViT(tiny_vit(), **{"num_classes": 3, **kwargs})


def test_token_pool_needs_class_token():
    with pytest.raises(ValueError, match="class token"):
        PromptedViT(tiny_vit(class_token=False, global_pool="avg"), num_classes=3, pool="token")


@pytest.mark.parametrize("name", ["resnet10t", "swin"])
def test_non_vit_backbone_is_refused(name):
    import timm

    if name == "swin":
        backbone = timm.create_model(
            "swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1), num_heads=(1, 1), img_size=56
        )
    else:
        backbone = timm.create_model(name)
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        PromptedViT(backbone, num_classes=3)


@pytest.mark.parametrize("case", CASES)
def test_without_prompts_equals_timm(case, images):
    """ViTClassifier (linear probe / full fine-tune) is timm's own forward with the new head."""
    overrides = CASES[case]
    model = ViTClassifier(tiny_vit(**overrides), num_classes=7)
    ref = VisionTransformer(**{**TINY, **overrides, "num_classes": 7}).eval()
    ref.load_state_dict(
        {**model.backbone.state_dict(), "head.weight": model.head.weight, "head.bias": model.head.bias}
    )
    x = torch.randn(2, 3, 40, 48) if overrides.get("dynamic_img_size") else images
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
