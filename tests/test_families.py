"""timm's Eva (EVA, EVA-02) and Beit families: their functions against timm's own forward, the prompt layout
(after the prefix, no position, outside EVA-02's rotary embedding and BEiT's relative position bias), and
every method that applies, at tiny size: forward, one step that moves only its tensors, save and reload."""

from __future__ import annotations

import itertools

import selfprompt as sp
from selfprompt.backbones import backbone_family, beit, eva
from selfprompt.config import TrainConfig
from selfprompt.engine import run
from selfprompt.engine.build import create_backbone
from selfprompt.init import init_prompts
from selfprompt.methods import applicable_methods, get_method, method_names
from selfprompt.methods.condensation.model import condense_at_random
from selfprompt.methods.cvpt import CVPT
from selfprompt.methods.prompt_tools import self_attention
from selfprompt.model import UnsupportedBackbone, ViTClassifier
from selfprompt.serving.multitask import MultiTaskViT

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FP32_ATOL
from engine_helpers import make_dataset, tiny_config
from prompt_method_checks import assert_rows_are_tokens
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer

SIZE = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
BACKBONES = {
    "eva02": lambda **kw: timm.create_model("eva02_tiny_patch14_224", **SIZE, **kw),
    "eva01": lambda **kw: timm.create_model("eva_giant_patch14_224", **SIZE, mlp_ratio=2.0, **kw),
    "eva-rope-registers-unfused": lambda **kw: Eva(
        **{**SIZE, "num_reg_tokens": 2, "qkv_fused": False, "init_values": 0.1, "use_rot_pos_emb": True, **kw}
    ),
    "beit": lambda **kw: timm.create_model("beit_base_patch16_224", **SIZE, **kw),
    "beit-shared-bias": lambda **kw: Beit(
        **SIZE,
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        global_pool="token",
    ),
}
EVAS = [name for name in BACKBONES if name.startswith("eva")]
SWIN = dict(
    img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=0
)
M = 3


def backbone(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny random backbone; the parameters timm initialises to zero or one (relative position bias tables,
    q/v biases, layer scales) are drawn too, so that a wrong layout shows."""
    torch.manual_seed(seed)
    model = SwinTransformer(**SWIN) if name == "swin" else BACKBONES[name](**kw)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if any(part in key for part in ("relative_position_bias_table", "q_bias", "v_bias")):
                param.normal_(0.0, 0.5)
            elif "gamma" in key:
                param.normal_(1.0, 0.2)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- the family functions against timm's own forward --------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_the_prologue_is_what_timm_feeds_block_0(name, images):
    bb = backbone(name)
    family = backbone_family(bb)
    assert family.name == ("eva" if name.startswith("eva") else "beit")
    seen = []
    bb.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        bb.forward_features(images)
        assert torch.equal(family.prologue(bb, images), seen[0])


@pytest.mark.parametrize("name", BACKBONES)
def test_running_the_blocks_from_their_inputs_is_timms_forward_features(name, images):
    bb = backbone(name)
    family = backbone_family(bb)
    with torch.no_grad():
        expected = bb.forward_features(images)
        x = family.prologue(bb, images)
        pairs = list(family.tokens_entering_blocks(bb, x, positions=family.positions(bb, images)))
        where = family.positions(bb, images)
        for index, ((block, h), (_, following)) in enumerate(itertools.pairwise(pairs)):
            assert torch.equal(family.run_block(block, h, where, index), following)
            assert torch.equal(family.residual_branches(block, h, where, index), following)
        last = family.run_block(pairs[-1][0], pairs[-1][1], where, len(pairs) - 1)
        torch.testing.assert_close(bb.norm(last), expected, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("name", BACKBONES)
def test_the_classifier_is_timms_forward_with_a_new_head(name, images):
    bb = backbone(name)
    model = ViTClassifier(bb, num_classes=5)
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(images), pre_logits=True)
        timms = bb.forward_head(bb.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ours, timms, rtol=0, atol=FP32_ATOL)


def test_the_attention_steps_are_timms_attention_without_positions():
    for bb in (backbone("eva02"), backbone("eva-rope-registers-unfused"), backbone("beit-shared-bias")):
        family = backbone_family(bb)
        attn = bb.blocks[0].attn
        x = torch.randn(2, 7, 32)
        with torch.no_grad():
            torch.testing.assert_close(family.attention(attn, x), attn(x), rtol=0, atol=FP32_ATOL)


# --- the prompt layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVAS)
def test_eva_prompts_are_register_tokens_without_position_outside_the_rotary_embedding(name, images):
    """Shallow prompts on Eva are timm's own Eva with M more register tokens holding them, at zero position
    embedding: after the prefix, no position, and (registers being prefix tokens) no rotary embedding."""
    model = sp.PromptedViT(backbone(name), num_classes=5, num_prompts=M)
    torch.nn.init.normal_(model.prompts)
    bb = model.backbone
    ref = backbone(name, num_reg_tokens=bb.num_prefix_tokens - 1 + M)
    state = {k: v for k, v in bb.state_dict().items() if k not in ("reg_token", "pos_embed")}
    prompts = model.prompts.detach()
    state["reg_token"] = prompts if bb.reg_token is None else torch.cat([bb.reg_token, prompts], dim=1)
    if bb.pos_embed is not None:
        pos, p = bb.pos_embed, bb.num_prefix_tokens
        if not bb.no_embed_class:
            pos = torch.cat([pos[:, :p], torch.zeros(1, M, pos.shape[-1]), pos[:, p:]], dim=1)
        state["pos_embed"] = pos
    ref.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.norm(model.forward_features(images)), ref.forward_features(images), rtol=0, atol=FP32_ATOL
        )


def mask_prompt_keys(monkeypatch, prefix: int, positioned: int) -> None:
    """Every attention (timm's and selfprompt's, through F.scaled_dot_product_attention) with M tokens more
    than ``positioned`` hides those M keys (after ``prefix``) from every other query."""
    original = F.scaled_dot_product_attention

    def masked(q, k, v, attn_mask=None, **kwargs):
        n = k.shape[-2]
        if n == positioned + M:
            hidden = torch.zeros(n, n)
            others = torch.cat([torch.arange(prefix), torch.arange(prefix + M, n)])
            hidden[others[:, None], torch.arange(prefix, prefix + M)[None, :]] = float("-inf")
            attn_mask = hidden if attn_mask is None else attn_mask + hidden
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("name", BACKBONES)
def test_prompts_that_cannot_reach_the_other_tokens_leave_the_backbones_features(
    name, deep, images, monkeypatch
):
    model = sp.PromptedViT(backbone(name), num_classes=5, num_prompts=M, deep=deep)
    torch.nn.init.normal_(model.prompts, std=3.0)
    bb, p = model.backbone, model.num_prefix_tokens
    with torch.no_grad():
        expected = bb.forward_features(images)
        unmasked = model.forward_features(images)
        mask_prompt_keys(monkeypatch, p, expected.shape[1])
        masked = model.forward_features(images)

    def others(x):
        return bb.norm(torch.cat([x[:, :p], x[:, p + M :]], dim=1))

    torch.testing.assert_close(others(masked), expected, rtol=0, atol=FP32_ATOL)
    assert (others(unmasked) - expected).abs().max() > 1e-4, "unmasked prompts do change the features"


def test_beit_keeps_inserted_tokens_out_of_the_relative_position_bias():
    bb = backbone("beit")
    attn = bb.blocks[0].attn
    where = beit.positions(bb)
    own = attn._get_rel_pos_bias()
    bias = beit.position_bias(attn, where.tokens + M, where)
    assert bias.shape == (1, 2, where.tokens + M, where.tokens + M)
    assert not bias[..., 1 : 1 + M, :].any() and not bias[..., :, 1 : 1 + M].any()
    kept = torch.cat([torch.arange(1), torch.arange(1 + M, where.tokens + M)])
    assert torch.equal(bias[..., kept[:, None], kept[None, :]], own)
    assert torch.equal(beit.position_bias(attn, where.tokens, where), own)


def test_eva_gives_inserted_tokens_the_identity_rotation():
    bb = backbone("eva02")
    where = eva.positions(bb)
    rope = eva.block_rope(where.tokens + M, where, 0)
    half = rope.shape[-1] // 2
    assert torch.equal(rope[M:], where.rope)
    assert not rope[:M, :half].any() and torch.equal(rope[:M, half:], torch.ones(M, half))


@pytest.mark.parametrize("name", ["eva02", "eva-rope-registers-unfused", "beit"])
def test_spt_prompts_are_the_familys_own_patch_tokens(name, images):
    """SPT's prototypes on Eva/Beit are patch tokens of the blocks' inputs as timm's own forward computes
    them (the patch embedding for layer 0)."""
    model = sp.PromptedViT(backbone(name), num_classes=5, num_prompts=M, deep=True)
    bb = model.backbone
    loader = [(images, torch.zeros(len(images), dtype=torch.long))]
    init_prompts(model, loader, "sample", seed=0)
    outputs = []
    for block in bb.blocks:
        block.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        tokens = [bb.patch_embed(images)]
        bb.forward_features(images)
    tokens.append(outputs[0][:, bb.num_prefix_tokens :])
    for layer in range(2):
        assert_rows_are_tokens(model.prompts[layer].detach(), tokens[layer])


# --- every method that applies ---------------------------------------------------------------------------

FAMILY_BACKBONES = ["eva02", "eva-rope-registers-unfused", "beit", "beit-shared-bias"]
#: What does not run on each family (E2VPT's key/value prompts need the attention's head_dim).
REFUSED = {"eva": set(), "beit": {"e2vpt"}}
#: Built here rather than from a recipe section: pc starts from a condensed vpt-deep adapter.
BUILT = {"pc": lambda bb: condense_at_random(sp.PromptedViT(bb, 5, num_prompts=M, deep=True), keep=0.5)}
CELLS = [
    (name, method)
    for name in FAMILY_BACKBONES
    for method in method_names()
    if method not in REFUSED[backbone_family(backbone(name)).name]
]


def settings(name: str):
    cfg = TrainConfig()
    cfg.model.method = name
    cfg.prompt.num_prompts = M
    return get_method(name).settings_of(cfg)


def test_the_methods_that_apply_are_all_but_those_refused():
    for name in FAMILY_BACKBONES:
        bb = backbone(name)
        refused = REFUSED[backbone_family(bb).name]
        assert applicable_methods(bb) == [m for m in method_names() if m not in refused]


@pytest.mark.parametrize(("name", "method"), CELLS)
def test_a_method_trains_its_tensors_only_and_reloads_equal(name, method, images, tmp_path):
    bb = backbone(name)
    model = BUILT[method](bb) if method in BUILT else get_method(method).create(bb, 5, settings(method))
    expected = set(model.adapter_parameters())
    assert {k for k, p in model.named_parameters() if p.requires_grad} == expected
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    loss = F.cross_entropy(model(images), torch.arange(len(images)) % 5)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= expected
    assert "head.weight" in moved
    model.eval()
    with torch.no_grad():
        logits = model(images)
    model.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, backbone(name)).eval()
    assert type(reloaded) is type(model) and reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded(images), logits)


def test_e2vpt_on_beit_is_refused_naming_why_and_those_that_apply():
    with pytest.raises(
        TypeError, match=r"E2VPT cannot run on timm's Beit: .*head_dim.*runs: linear, full, vpt-"
    ):
        get_method("e2vpt").create(backbone("beit"), 5, settings("e2vpt"))


@pytest.mark.parametrize("name", ["eva02", "eva-rope-registers-unfused", "beit", "beit-shared-bias"])
def test_the_attention_steps_with_positions_are_the_blocks_own_with_prompts(name):
    """GaPT's and E2VPT's attention (computed from the family's steps) with prompts inserted: with no
    temperature and no key/value prompts it is the block's own, positions included."""
    bb = backbone(name)
    family = backbone_family(bb)
    where = family.positions(bb)
    x = torch.randn(2, where.tokens + M, 32)
    for index, block in enumerate(bb.blocks):
        with torch.no_grad():
            own = family.run_block(block, x, where, index)
            steps = family.residual_branches(
                block,
                x,
                where,
                index,
                attn=lambda h, b=block, i=index: self_attention(b.attn, h, None, None, where, i),
            )
        torch.testing.assert_close(steps, own, rtol=0, atol=FP32_ATOL)


def test_the_multitask_server_refuses_the_new_families_for_now():
    with pytest.raises(UnsupportedBackbone, match="serve its adapters one model at a time"):
        MultiTaskViT(backbone("eva02"))


# --- Swin: the methods that change Linear layers, biases or the head ------------------------------------

SWIN_METHODS = ["linear", "full", "bitfit", "lora", "ssf"]


def test_on_swin_only_the_linear_bias_and_head_methods_apply(images):
    swin = backbone("swin")
    assert applicable_methods(swin) == SWIN_METHODS
    model = ViTClassifier(swin, num_classes=5)
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(images), pre_logits=True)
        timms = swin.forward_head(swin.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ours, timms, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_a_method_on_swin_trains_its_tensors_only_and_reloads_equal(method, images, tmp_path):
    test_a_method_trains_its_tensors_only_and_reloads_equal("swin", method, images, tmp_path)


@pytest.mark.parametrize("method", ["vpt-deep", "spt-shallow", "adaptformer", "gapt", "cvpt", "e2vpt"])
def test_the_others_are_refused_on_swin_naming_why_and_those_that_apply(method):
    with pytest.raises(
        TypeError,
        match=r"cannot run on timm's SwinTransformer: .*On timm's SwinTransformer "
        r"selfprompt runs: linear, full, bitfit, lora, ssf\.",
    ):
        get_method(method).create(backbone("swin"), 5, settings(method))


def test_cvpt_and_prompts_on_swin_say_why_in_a_sentence():
    with pytest.raises(UnsupportedBackbone, match=r"CVPT cannot run on timm's SwinTransformer: its windowed"):
        CVPT(backbone("swin"), num_classes=5)
    with pytest.raises(TypeError, match="supports timm VisionTransformer, Eva, Beit backbones for it"):
        sp.PromptedViT(backbone("swin"), num_classes=5)


# --- through the engine: a run from a timm name, and its adapter on a fresh backbone --------------------

RUNS = {
    "eva02": ("eva02_tiny_patch14_224", {}, "spt-deep"),
    "beit": ("beit_base_patch16_224", {}, "vpt-deep"),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4},
        "lora",
    ),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_run_on_the_family_trains_and_its_adapter_reloads(name, tmp_path):
    architecture, extra, method = RUNS[name]
    cfg = tiny_config(make_dataset(tmp_path / "data"), tmp_path / "run", method, **{"optim.epochs": 2})
    cfg.model.backbone = architecture
    cfg.model.backbone_kwargs = {**SIZE, **extra} if name == "swin" else dict(SIZE)
    if name == "swin":
        cfg.model.backbone_kwargs.pop("depth")
    summary = run(cfg, log=lambda _: None)
    assert summary["final"]["seeds"] == [0]
    adapter = next((tmp_path / "run").rglob("final/adapter"))
    model = sp.load_pretrained(adapter, create_backbone(cfg.model))
    assert type(model).__name__ == get_method(method).model_class.__name__
