"""VIPAMIN's prompt initializer: its seeding, its two parts computed by hand, every prompt method that takes
``prompt.init``, ``selfprompt train`` end to end, and its refusals."""

import json
import warnings

import selfprompt as sp
from selfprompt.cli import main
from selfprompt.init.collect import block_inputs
from selfprompt.init.vipamin import DEFAULT_LAMBDA, DEFAULT_TOPK, VipaminInit
from selfprompt.methods import get_method, method_names

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import cli_args, make_dataset
from test_families import backbone as family_backbone

NARROW = 16  # 16x16 images: 4x4 = 16 patches + the class token, fewer tokens than the width (32)


def narrow_vit():
    """A tiny ViT on 16x16 images with non-zero value biases (so the bias terms are exercised)."""
    backbone = tiny_vit(img_size=NARROW)
    with torch.no_grad():
        for block in backbone.blocks:
            block.attn.qkv.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return backbone


def narrow_images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, NARROW, NARROW, generator=torch.Generator().manual_seed(seed))


def vipamin(model, images, seed=0, **options) -> torch.Tensor:
    return sp.init_prompts(model, [images[:4], images[4:]], "vipamin", seed=seed, options=options)


def test_registered_with_its_options():
    assert "vipamin" in sp.available_initializers()
    assert VipaminInit.options == ("topk", "lam") and VipaminInit.reads_blocks
    assert (DEFAULT_TOPK, DEFAULT_LAMBDA) == (8, 0.5)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_same_seed_same_prompts_another_seed_others(lam):
    model = sp.PromptedViT(narrow_vit(), num_classes=3, num_prompts=4, deep=True)
    images = narrow_images()
    first = vipamin(model, images, seed=0, topk=2, lam=lam)
    assert torch.equal(model.prompts.detach(), first) and torch.isfinite(first).all()
    assert torch.equal(vipamin(model, images, seed=0, topk=2, lam=lam), first)
    # both parts draw: the matched part its query prompts, the orthogonal part its seed prompts
    assert not torch.allclose(vipamin(model, images, seed=1, topk=2, lam=lam), first)


def block_io(backbone, images):
    """Per block, from timm's own forward (hooks): the tokens entering it and its attention's merged heads
    before ``proj``."""
    entering, merged, hooks = [], [], []
    for block in backbone.blocks:
        hooks.append(block.register_forward_pre_hook(lambda m, args: entering.append(args[0])))
        hooks.append(block.attn.proj.register_forward_pre_hook(lambda m, args: merged.append(args[0])))
    with torch.no_grad():
        backbone.forward_features(images)
    for hook in hooks:
        hook.remove()
    return [(x.double(), o.double()) for x, o in zip(entering, merged, strict=True)]


def by_hand(model, images, seed, topk, lam):
    """VIPAMIN's prompts from the definition: per layer, VPT's xavier draw twice (query prompts, then seed
    prompts), the key-cosine match and the value projected off the attention outputs' span."""
    generator = torch.Generator().manual_seed(seed)
    bound, shape = model.xavier_bound(), (model.num_prompts, model.embed_dim)
    draws = [
        [((torch.rand(shape, generator=generator) * 2 - 1) * bound).double() for _ in range(2)]
        for _ in range(model.num_prompt_layers)
    ]
    d, heads = model.embed_dim, model.backbone.blocks[0].attn.num_heads
    layers = []
    for block, (queries, seeds), (x, merged) in zip(
        model.backbone.blocks, draws, block_io(model.backbone, images), strict=False
    ):
        weight, bias = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
        norm1 = block.norm1.double()

        def keys(tokens, weight=weight, bias=bias, norm1=norm1):
            k = norm1(tokens) @ weight[d : 2 * d].T + bias[d : 2 * d]
            return k.reshape(*k.shape[:-1], heads, -1).mean(-2)  # averaged over heads

        patches = x[:, 1:]
        cosine = torch.nn.functional.cosine_similarity(
            keys(queries)[:, None], keys(patches).mean(0)[None], dim=-1
        )
        nearest = cosine.topk(topk, dim=1).indices
        matched = patches.mean(0)[nearest].mean(1)
        w_v, b_v = weight[2 * d :], bias[2 * d :]
        outputs = merged.mean(0)  # (17, 32): 17 directions, the rest of the width lies outside them
        basis, _ = torch.linalg.qr(outputs.T)
        values = seeds @ w_v.T + b_v
        outside = values - values @ basis @ basis.T
        orthogonal = torch.linalg.solve(w_v, (outside - b_v).T).T
        # the defining property: the orthogonal prompts' values are orthogonal to every attention output
        assert (orthogonal @ w_v.T + b_v) @ outputs.T == pytest.approx(torch.zeros(len(seeds), 17), abs=1e-8)
        layers.append((1 - lam) * matched + lam * orthogonal)
    return torch.stack(layers).float()


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("topk, lam", [(1, 0.0), (3, 0.0), (2, 1.0), (5, 0.3)])
def test_prompts_match_the_definition_computed_by_hand(deep, topk, lam):
    model = sp.PromptedViT(narrow_vit(), num_classes=3, num_prompts=5, deep=deep)
    images = narrow_images()
    prompts = vipamin(model, images, seed=4, topk=topk, lam=lam)
    torch.testing.assert_close(prompts, by_hand(model, images, 4, topk, lam), rtol=1e-4, atol=1e-5)


def test_matched_prompts_are_means_of_the_tokens_entering_each_block():
    model = sp.PromptedViT(narrow_vit(), num_classes=3, num_prompts=3, deep=True)
    images = narrow_images()
    entering = [x[:, 1:].mean(0).float() for x, _ in block_io(model.backbone, images)]
    every = vipamin(model, images, topk=16, lam=0.0)  # k = all 16 positions: whatever the queries
    for layer, prompts in enumerate(every):
        torch.testing.assert_close(prompts, entering[layer].mean(0).expand(3, -1), rtol=1e-5, atol=1e-6)
    nearest = vipamin(model, images, topk=1, lam=0.0)  # k = 1: one position's image-averaged token
    for layer, prompts in enumerate(nearest):
        distances = torch.cdist(prompts, entering[layer]).min(dim=1).values
        assert (distances < 1e-5).all(), f"layer {layer}: a prompt is not one position's mean token"


def test_block_0_reads_the_position_embedded_tokens():
    """Block 0's input carries the position embedding (as the official code's pos_drop output), unlike
    SPT's patch embedding: with k = 1 each prompt is one position's token, position embedding included."""
    model = sp.PromptedViT(narrow_vit(), num_classes=3, num_prompts=2)
    images = narrow_images()
    with torch.no_grad():
        plain = model.backbone.patch_embed(images).mean(0)
        placed = plain + model.backbone.pos_embed[0, 1:]
    prompts = vipamin(model, images, topk=1, lam=0.0)[0]
    assert torch.cdist(prompts, placed).min(dim=1).values.max() < 1e-5
    assert torch.cdist(prompts, plain).min(dim=1).values.min() > 1e-3


def takes_any_init() -> list[str]:
    return [n for n in method_names() if get_method(n).has_prompts and get_method(n).inits is None]


REFUSE = {
    "cvpt": "cross-attended",
    "apt": "keys scored by the block's normed tokens",
}  # prompts off the sequence


@pytest.mark.parametrize("method", [m for m in takes_any_init() if m not in REFUSE])
def test_shapes_for_every_prompt_method_that_takes_an_initializer(method):
    images = narrow_images(8)
    extra = {"deep_layers": 2} if method == "spt-deep" else {}
    model = sp.get_model(
        narrow_vit(), method, 3, init_data=[images], init="vipamin", init_topk=2, num_prompts=4, **extra
    )
    again = sp.get_model(
        narrow_vit(), method, 3, init_data=[images], init="vipamin", init_topk=2, num_prompts=4, **extra
    )
    xavier = sp.get_model(narrow_vit(), method, 3, init_data=[images], num_prompts=4, **extra)
    layers = {"spt-deep": 2, "spt-shallow": 1, "gapt": 1}.get(method, 3)
    assert model.prompts.shape == (layers, 4, 32)
    assert torch.isfinite(model.prompts).all()
    assert torch.equal(model.prompts, again.prompts)
    assert not torch.allclose(model.prompts, xavier.prompts)


def test_takes_every_prompt_method_but_those_whose_prompts_are_off_the_sequence():
    assert {"spt-shallow", "spt-deep", "gapt", "e2vpt", "vfpt", *REFUSE} <= set(takes_any_init())
    for method, why in REFUSE.items():
        with pytest.raises(ValueError, match=rf"{method} with prompt.init='vipamin'.*{why}"):
            sp.get_model(tiny_vit(), method, 3, init="vipamin")
    with pytest.raises(ValueError, match="built from other tokens"):  # a model with its own token source
        sp.init_prompts(sp.CVPT(tiny_vit(), 3, num_prompts=2), [narrow_images()], "vipamin")


@pytest.mark.parametrize("method", ["spt-deep", "spt-shallow"])
def test_selfprompt_train_end_to_end(method, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [*cli_args(data, out), "--model.method", method, "--prompt.init", "vipamin"]
    options = ["--prompt.init_topk", "2", "--prompt.init_lambda", "0.25"]
    assert main(["train", *args, *options, "--stage", "final", "--optim.epochs", "1"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "init: vipamin" in saved and "init_topk: 2" in saved and "init_lambda: 0.25" in saved
    final = json.loads((out / "seed0/final/result.json").read_text())
    assert 0 <= final["last_test_acc"] <= 1


BAD_SETTINGS = [
    (["--prompt.init", "vipamin", "--prompt.init_topk", "0"], "prompt.init_topk must be an integer >= 1"),
    (["--prompt.init", "vipamin", "--prompt.init_lambda", "1.5"], "prompt.init_lambda must be in [0, 1]"),
    (["--prompt.init", "vipamin", "--prompt.init_lambda", "nan"], "prompt.init_lambda must be a finite"),
    (["--prompt.init", "kmeans", "--prompt.init_topk", "2"], "init_topk is an option of prompt.init vipamin"),
    (["--prompt.init_lambda", "0.5"], "init_lambda is an option of prompt.init vipamin, not of the method"),
]


@pytest.mark.parametrize("extra, message", BAD_SETTINGS)
def test_bad_settings_are_refused_before_the_run_folder_exists(extra, message, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", *cli_args(data, out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_bad_options_and_inputs_of_init_prompts():
    model = sp.PromptedViT(narrow_vit(), num_classes=3, num_prompts=4)
    images = narrow_images()
    with pytest.raises(ValueError, match=r"topk must be an integer >= 1"):
        vipamin(model, images, topk=0)
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        vipamin(model, images, lam=-0.1)
    with pytest.raises(ValueError, match="has no option lam"):
        sp.init_prompts(model, [images], "kmeans", options={"lam": 0.5})
    with pytest.raises(ValueError, match=r"topk \(17\) exceeds the 16 patch tokens"):
        vipamin(model, images, topk=17)
    with pytest.raises(ValueError, match="pass a loader"):
        sp.init_prompts(model, None, "vipamin")
    dynamic = sp.PromptedViT(tiny_vit(img_size=NARROW, dynamic_img_size=True), num_classes=3, num_prompts=2)
    with pytest.raises(ValueError, match="use one image size"):
        sp.init_prompts(dynamic, [images, torch.randn(2, 3, 8, 8)], "vipamin", options={"topk": 1})


def test_attention_outputs_spanning_the_width_warn():
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4)  # 65 tokens, width 32
    with pytest.warns(UserWarning, match="span all 32 dimensions"):
        sp.init_prompts(model, [torch.randn(4, 3, 32, 32)], "vipamin")


@pytest.mark.parametrize("name", ["eva02", "eva-rope-registers-unfused", "beit", "beit-shared-bias"])
def test_other_families_attention_outputs_are_their_forwards(name):
    """On EVA (rotary) and BEiT (relative-position bias) the attention outputs VIPAMIN spans are the merged
    heads timm's own forward feeds to ``proj``, block by block."""
    bb = family_backbone(name)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    merged, hooks = [], []
    for block in bb.blocks:
        hooks.append(block.attn.proj.register_forward_pre_hook(lambda m, args: merged.append(args[0])))
    with torch.no_grad():
        bb.forward_features(images)
    for hook in hooks:
        hook.remove()
    model = sp.PromptedViT(bb, num_classes=3, num_prompts=2, deep=True)
    for inputs, expected in zip(block_inputs(bb, images, 2), merged, strict=True):
        layer = VipaminInit(model, generator=torch.Generator().manual_seed(0), max_tokens=1, topk=1)
        layer.update_block(inputs)
        torch.testing.assert_close(layer.outputs.float() / 3, expected.mean(0), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():  # 64 patches + prefix on a 32-wide backbone may span it all
        warnings.simplefilter("ignore")
        prompts = sp.init_prompts(model, [images], "vipamin", options={"topk": 2})
    assert prompts.shape == (2, 2, 32) and torch.isfinite(prompts).all()


def test_init_prompts_command_caches_by_its_options(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    args = ["init-prompts", *cli_args(data, tmp_path / "unused"), "--prompt.init", "vipamin"]
    output = ["--output", str(tmp_path / "prompts.safetensors")]
    assert main([*args, "--prompt.init_topk", "2", *output]) == 0
    assert "computed vipamin prompts (2, 4, 32)" in capsys.readouterr().out
    assert main([*args, "--prompt.init_topk", "2", *output]) == 0
    assert "reused cached" in capsys.readouterr().out
    assert main([*args, "--prompt.init_topk", "3", *output]) == 0
    assert "computed vipamin" in capsys.readouterr().out
