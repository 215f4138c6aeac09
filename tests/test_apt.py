"""APT (docs/methods.md, APT): each block's attention output gets the approximated effect of M prompts; no
tokens enter the sequence."""

import math

from selfprompt.backbones import create_backbone
from selfprompt.cli import main
from selfprompt.engine.build import method_settings
from selfprompt.engine.run import run
from selfprompt.init import init_prompts
from selfprompt.methods import get_method
from selfprompt.methods.apt import APT, APTSettings, approximated_prompts
from selfprompt.methods.prompt import PromptedViT, PromptRunSettings
from selfprompt.methods.prompt_tools import PromptPart
from selfprompt.model import ViTClassifier
from selfprompt.serving import MultiTaskViT

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import adapter, make_dataset, tiny_config
from prompt_method_checks import assert_rows_are_tokens, check_round_trip, check_trains_exactly

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]
TRAINED = {"prompts", "key_down", "key_up", "scales", "head.weight", "head.bias"}


def perturbed(model: APT, seed: int = 0) -> APT:
    """Every APT tensor away from its start (W2 = 0 would leave W1 without a gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (model.prompts, model.key_down, model.key_up, model.scales):
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=g))
    return model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_zero_prompts_at_the_initial_scale_are_the_linear_probe_exactly(images, backbone):
    vit = tiny_vit(**backbone)
    torch.manual_seed(0)
    linear = ViTClassifier(vit, num_classes=5).eval()
    model = APT(vit, num_classes=5, num_prompts=7).eval()
    with torch.no_grad():
        model.head.load_state_dict(linear.head.state_dict())
        model.key_up.normal_()  # any W1, W2: with P = 0 every score is 0
        assert torch.equal(model.scales, torch.zeros(3))
        assert not torch.equal(model(images), linear(images)), "the initial prompts act"
        model.prompts.zero_()
        assert torch.equal(model(images), linear(images))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_block_gets_the_sequence_at_its_own_length(images, backbone):
    model = perturbed(APT(tiny_vit(**backbone), num_classes=5, num_prompts=7)).eval()
    seen, forward_block = [], model.forward_block

    def record(index, block, x):
        seen.append((index, x.shape))
        return forward_block(index, block, x)

    model.forward_block = record
    tokens = model.num_prefix_tokens + 64
    with torch.no_grad():
        assert model.forward_features(images).shape == model.backbone.forward_features(images).shape
    assert seen == [(i, (len(images), tokens, 32)) for i in range(3)]
    assert model.num_extra_tokens == 0


def test_a_block_is_the_written_out_formula():
    """x1 = x + exp(s) (attn(h) + max_j A_ij (A P)_i), h = LN1(x), A = ReLU(h (P + P W1^T W2^T)^T); then
    the block's MLP branch."""
    model = perturbed(APT(tiny_vit(), num_classes=5, num_prompts=7, rank=2)).eval()
    block, x = model.backbone.blocks[1], torch.randn(2, 65, 32)
    p, w1, w2, s = model.prompts[1], model.key_down[1], model.key_up[1], model.scales[1]
    with torch.no_grad():
        h = block.norm1(x)
        scores = torch.relu(h @ (p + (w2 @ (w1 @ p.T)).T).T)  # (2, 65, 7)
        added = scores.max(dim=-1, keepdim=True).values * (scores @ p)
        x1 = x + math.exp(s.item()) * (block.attn(h) + added)
        expected = x1 + block.mlp(block.norm2(x1))
        torch.testing.assert_close(model.forward_block(1, block, x), expected)


def test_the_gate_passes_no_gradient():
    g = torch.Generator().manual_seed(0)
    x, p = torch.randn(2, 9, 16, generator=g), torch.randn(5, 16, generator=g).requires_grad_()
    down, up = torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g)
    weights = torch.randn(2, 9, 16, generator=g)
    (grad,) = torch.autograd.grad((approximated_prompts(x, p, down, up) * weights).sum(), p)
    scores = torch.relu(x @ (p + p @ down.T @ up.T).T)
    gate = scores.amax(-1, keepdim=True)
    (by_hand,) = torch.autograd.grad(((scores @ p) * gate.detach() * weights).sum(), p, retain_graph=True)
    (through_gate,) = torch.autograd.grad(((scores @ p) * gate * weights).sum(), p)
    torch.testing.assert_close(grad, by_hand)
    assert not torch.allclose(grad, through_gate)


def test_exactly_the_prompts_key_map_scales_and_head_train(images):
    model = perturbed(APT(tiny_vit(), num_classes=5, num_prompts=7))
    check_trains_exactly(model, TRAINED, images)


def test_the_start_follows_the_official_code():
    model = APT(tiny_vit(), num_classes=5, num_prompts=7)
    assert model.key_down.shape == (3, 4, 32) and model.key_up.shape == (3, 32, 4)
    assert torch.equal(model.key_up, torch.zeros_like(model.key_up))  # W2 = 0
    assert torch.equal(model.scales, torch.zeros(3))  # exp(s) = 1
    assert 0.8 < model.key_down.std().item() < 1.2  # W1 ~ N(0, 1)
    assert model.xavier_bound() == pytest.approx(0.02 * math.sqrt(3))  # uniform with N(0, 0.02)'s std
    assert model.prompts.shape == (3, 7, 32) and model.prompts.abs().max() <= model.xavier_bound()
    # L (M D + 2 r D + 1) + head
    assert model.num_adapter_parameters() == 3 * (7 * 32 + 2 * 4 * 32 + 1) + 5 * 32 + 5


@pytest.mark.parametrize("backbone", [{}, {"class_token": False, "global_pool": "avg"}])
def test_round_trip(images, tmp_path, backbone):
    model = APT(tiny_vit(**backbone), num_classes=5, num_prompts=7, rank=2, deep_layers=2)
    reloaded = check_round_trip(model, images, tmp_path, **backbone)
    assert (reloaded.config.rank, reloaded.config.deep_layers) == (2, 2)
    assert reloaded.key_down.shape == (2, 2, 32)
    again = APT.from_pretrained(tmp_path, tiny_vit(**backbone)).eval()
    with torch.no_grad():
        assert torch.equal(again(images), reloaded(images))
    with pytest.raises(ValueError, match="holds a APT, not a PromptedViT"):
        PromptedViT.from_pretrained(tmp_path, tiny_vit(**backbone))


def test_blocks_past_deep_layers_run_as_they_are(images):
    model = perturbed(APT(tiny_vit(), num_classes=5, num_prompts=7, deep_layers=1)).eval()
    block, x = model.backbone.blocks[2], torch.randn(2, 65, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_block(2, block, x), block(x))


def normed_patch_tokens(vit, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    """LN1 of the tokens entering each block of the frozen backbone, patch tokens on their grid."""
    grids = []
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for block in vit.blocks[:num_layers]:
            grids.append(block.norm1(x)[:, vit.num_prefix_tokens :].reshape(len(images), 8, 8, -1))
            x = block(x)
    return grids


def test_spt_kmeans_prototypes_are_the_prompts(images):
    vit = tiny_vit(reg_tokens=2)
    model, method = APT(vit, num_classes=5, num_prompts=4), get_method("apt")
    start = {k: v.detach().clone() for k, v in model.adapter_parameters().items()}
    method.prepare(method, model, PromptRunSettings(init="kmeans"), [images], 3)
    view = PromptPart(model, 4, 3, tokens_by_layer=lambda ims, n: normed_patch_tokens(vit, ims, n))
    expected = init_prompts(view, [images], "kmeans", seed=3)
    assert torch.equal(model.prompts, expected)
    assert not torch.equal(model.prompts, start["prompts"])
    for name in ("key_down", "key_up", "scales"):
        assert torch.equal(getattr(model, name), start[name]), name


def test_spt_sample_prompts_are_normed_patch_tokens(images):
    vit = tiny_vit()
    model, method = APT(vit, num_classes=5, num_prompts=4), get_method("apt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    for layer, tokens in enumerate(normed_patch_tokens(vit, images, 3)):
        assert_rows_are_tokens(model.prompts[layer].detach(), tokens)


def test_settings_are_checked_up_front(tmp_path):
    assert APTSettings().problems() == []
    with pytest.raises(ValueError, match=r"apt\.rank must be an integer >= 1, got 0"):
        APT(tiny_vit(), num_classes=5, rank=0)
    with pytest.raises(ValueError, match="deep must be True"):
        APT(tiny_vit(), num_classes=5, deep=False)
    with pytest.raises(ValueError, match=r"apt.*set track.every 0"):
        method_settings(tiny_config(tmp_path, tmp_path, "apt", **{"track.every": 1}))
    method, settings = method_settings(tiny_config(tmp_path, tmp_path, "apt", **{"apt.rank": 2}))
    model = method.create(tiny_vit(), 3, settings)
    assert (type(model), model.config.rank, model.num_prompts) == (APT, 2, 4)


def test_trains_through_the_engine_from_kmeans_prototypes(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", "apt", **{"optim.epochs": 1, "prompt.init": "kmeans"})
    run(cfg, log=lambda _: None)
    tensors = adapter(tmp_path / "run")
    assert {k for k in tensors} == TRAINED
    assert tensors["prompts"].shape == (2, 4, 32)  # the tiny backbone: 2 blocks, D = 32
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_served_in_a_mixed_batch_beside_input_prompts(images, tmp_path):
    """APT tasks share the backbone's pass with input prompts and linear probes (no prompt tokens: no length
    group of their own), grouped, masked and in the export's static pass; each row matches its own model."""
    torch.manual_seed(0)
    models = {
        "apt": perturbed(APT(tiny_vit(), 4, num_prompts=5)),
        "deep": PromptedViT(tiny_vit(), 3, num_prompts=2, deep=True),
        "linear": ViTClassifier(tiny_vit(), 6),
    }
    multi = MultiTaskViT(tiny_vit())
    for name, model in models.items():
        multi.add_adapter(name, model.save_pretrained(tmp_path / name))
    masked = MultiTaskViT(tiny_vit(), mask=True)
    for name in models:
        masked.add_adapter(name, tmp_path / name)
    assert all(t.shared for t in multi.tasks.values())
    tasks = ["apt", "deep", "apt", "linear", "deep", "apt"]
    index = multi._state[2]
    static = multi.forward_shared(images, torch.tensor([index[t] for t in tasks]), static=True)
    with torch.no_grad():  # the first 3 logits: the fewest classes
        expected = torch.stack([models[t].eval()(images)[i, :3] for i, t in enumerate(tasks)])
    for served in (multi, masked):
        rows = served(images, tasks)
        torch.testing.assert_close(torch.stack([r[:3] for r in rows]), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(static[:, :3], expected[:, :3], rtol=0, atol=1e-5)


def test_exports_to_onnx_with_a_dynamic_batch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = perturbed(APT(create_backbone("vit_mini_patch4_32.mae_fmnist"), 3, num_prompts=5)).eval()
    model.save_pretrained(tmp_path / "apt")
    output = tmp_path / "apt.onnx"
    assert main(["export", str(tmp_path / "apt"), "--format", "onnx", "--output", str(output)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        assert (got - expected).abs().max().item() <= 1e-4
