"""BPT (docs/methods.md, BPT): bilinear prompts P_l = A_l B_l^T whose bases start as columns of the whitening
matrix of Wq Wk^T and the task's mean patch tokens."""

import json

import selfprompt as sp
from selfprompt.cli import main
from selfprompt.config import ModelConfig
from selfprompt.engine import run
from selfprompt.engine.build import create_backbone, method_settings
from selfprompt.methods import get_method
from selfprompt.methods.bpt import (
    BPT,
    attention_matrix,
    mean_patch_tokens,
    whitening_matrix,
)
from selfprompt.serving.export import MultiTaskGraph
from selfprompt.serving.loading import load_multitask

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from engine_helpers import make_dataset, tiny_config
from prompt_method_checks import check_round_trip, check_trains_exactly

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]
#: The whitened data's covariance is I to this (float32 bases of a Sigma with condition number up to ~1e7).
TOLERANCE = 1e-3


def quiet(_: str) -> None:
    pass


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def test_whitening_matrix_by_hand():
    """diag(4, 9, 1/4) -> diag(1/2, 1/3, 2); any full-rank Sigma: W symmetric and W Sigma W = I."""
    torch.testing.assert_close(
        whitening_matrix(torch.diag(torch.tensor([4.0, 9.0, 0.25]))),
        torch.diag(torch.tensor([0.5, 1 / 3, 2.0], dtype=torch.float64)),
    )
    data = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = data @ data.T / 6
    w = whitening_matrix(sigma)
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w @ sigma @ w, eye(6))
    torch.testing.assert_close((w @ data) @ (w @ data).T / 6, eye(6))  # the whitened data's covariance


def test_eigenvalues_below_the_floor_are_raised_to_it():
    """eps = 0.01 on eigenvalues (1, 0.5, 1e-4): the last is whitened as if it were 0.01."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    sigma = q @ torch.diag(torch.tensor([1.0, 0.5, 1e-4], dtype=torch.float64)) @ q.T
    w = whitening_matrix(sigma, eps=0.01)
    torch.testing.assert_close(
        w @ sigma @ w, q @ torch.diag(torch.tensor([1.0, 1.0, 0.01], dtype=torch.float64)) @ q.T
    )
    with pytest.raises(ValueError, match="singular"):
        whitening_matrix(torch.zeros(3, 3))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_attention_matrix_is_wq_wk_transposed(backbone):
    """x (Wq Wk^T) y^T is the unscaled logit of x and y summed over heads, biases left out."""
    vit = tiny_vit(**backbone)
    block, dim = vit.blocks[1], vit.embed_dim
    weight = block.attn.qkv.weight.double()
    torch.testing.assert_close(attention_matrix(block), weight[:dim].T @ weight[dim : 2 * dim])
    x, y = torch.randn(2, dim), torch.randn(3, dim)
    q, k = F.linear(x, block.attn.qkv.weight[:dim]), F.linear(y, block.attn.qkv.weight[dim : 2 * dim])
    torch.testing.assert_close((x.double() @ attention_matrix(block) @ y.double().T).float(), q @ k.T)


def hand_statistics(vit, images: torch.Tensor, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: Abar = Wq Wk^T Xbar^T (D x N_p) of the patch tokens entering it; Sigma = Abar Abar^T / D."""
    out, dim = [], vit.embed_dim
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for block in vit.blocks[:layers]:
            weight = block.attn.qkv.weight.double()
            mean = x[:, vit.num_prefix_tokens :].double().mean(0)
            data = weight[:dim].T @ weight[dim : 2 * dim] @ mean.T
            out.append((data, data @ data.T / dim))
            x = block(x)
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("deep", [False, True])
def test_whitened_bases_make_the_datas_covariance_the_identity(images, backbone, deep):
    """After whitening, each basis is C columns of Sigma_l^(-1/2), and the data a prompt meets, seen through
    it, has covariance I: (B^T Abar)(B^T Abar)^T / D = B^T Sigma B = I_C (64 patches > D = 32: Sigma is full
    rank; eps 0, no floor)."""
    model = BPT(tiny_vit(**backbone), 5, num_prompts=4, deep=deep, rank=12, eps=0.0)
    sigmas = model.whiten([images[:4], images[4:]])
    layers = 3 if deep else 1
    assert len(sigmas) == layers
    for layer, (data, sigma) in enumerate(hand_statistics(model.backbone, images, layers)):
        torch.testing.assert_close(sigmas[layer], sigma)
        basis = model.basis(layer).double()
        whitened = basis.T @ data
        assert (whitened @ whitened.T / model.embed_dim - eye(12)).abs().max() <= TOLERANCE
        w = whitening_matrix(sigma)
        distance = torch.cdist(basis.T, w.T).min(dim=1).values  # each column is a column of W
        assert distance.max() <= TOLERANCE * w.abs().max()


def test_the_mean_tokens_are_those_entering_each_block_without_prompts(images):
    vit = tiny_vit(reg_tokens=2)
    means = mean_patch_tokens(vit, [images], 3)
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for layer, block in enumerate(vit.blocks):
            torch.testing.assert_close(means[layer].float(), x[:, 3:].mean(0))
            x = block(x)


def test_the_column_draw_is_seeded(images):
    a, b, c = (BPT(tiny_vit(), 5, num_prompts=4, rank=8) for _ in range(3))
    a.whiten([images], seed=0), b.whiten([images], seed=0), c.whiten([images], seed=1)
    assert torch.equal(a.bases, b.bases) and not torch.equal(a.bases, c.bases)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_the_prompts_entering_each_block(images, backbone):
    """Shallow: one (N, C) code and (D, C) basis, the prompts enter block 0 only; deep: one per block, each
    block's prompt rows are A_l B_l^T; the official widths by default (capped at D = 32)."""
    prefix = tiny_vit(**backbone).num_prefix_tokens
    for deep, layers in ((False, 1), (True, 3)):
        model = BPT(tiny_vit(**backbone), 5, deep=deep, rank=6, num_prompts=4).eval()
        assert model.codes.shape == (layers, 4, 6)
        assert model.layer_prompts(0).shape == (4, 32)
        seen: list[torch.Tensor] = []
        record = seen.append
        hooks = [b.register_forward_pre_hook(lambda _, a, r=record: r(a[0])) for b in model.backbone.blocks]
        with torch.no_grad():
            assert model(images).shape == (6, 5)
        for hook in hooks:
            hook.remove()
        assert [s.shape[1] for s in seen] == [prefix + 4 + 64] * 3
        for layer in range(layers):
            torch.testing.assert_close(seen[layer][0, prefix : prefix + 4], model.layer_prompts(layer))
    assert (BPT(tiny_vit(), 5).num_prompts, BPT(tiny_vit(), 5).rank) == (100, 32)
    assert (BPT(tiny_vit(), 5, deep=True).num_prompts, BPT(tiny_vit(), 5, deep=True).rank) == (50, 32)
    with pytest.raises(ValueError, match=r"bpt\.rank must be at most the embedding width 32, got 33"):
        BPT(tiny_vit(), 5, rank=33)


def test_shallow_trains_its_codes_basis_and_head(images):
    model = BPT(tiny_vit(), 5, num_prompts=4, rank=6)
    check_trains_exactly(model, {"codes", "bases", "head.weight", "head.bias"}, images)


def test_deep_keeps_the_early_bases_frozen(images):
    """trained_bases 1 of 3: the adapter holds every basis, the gradient reaches the codes, the last basis and
    the head only; the backbone stays frozen and in eval mode."""
    model = BPT(tiny_vit(), 5, num_prompts=4, rank=6, deep=True, trained_bases=1)
    assert (model.bases.shape, model.frozen_bases.shape) == ((1, 32, 6), (2, 32, 6))
    assert set(model.adapter_parameters()) == {"codes", "bases", "frozen_bases", "head.weight", "head.bias"}
    trained = {"codes", "bases", "head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training
    F.cross_entropy(model(images), torch.arange(6) % 5).backward()
    assert {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    } == trained
    assert model.num_adapter_parameters() == 3 * 4 * 6 + 32 * 6 + 5 * 32 + 5


@pytest.mark.parametrize("deep", [False, True])
def test_round_trip(images, tmp_path, deep):
    model = BPT(tiny_vit(reg_tokens=2), 5, num_prompts=4, rank=6, deep=deep, trained_bases=2)
    model.whiten([images])
    reloaded = check_round_trip(model, images, tmp_path, reg_tokens=2)
    for name, tensor in model.adapter_parameters().items():
        assert torch.equal(reloaded.adapter_parameters()[name], tensor), name
    again = BPT.from_pretrained(tmp_path, tiny_vit(reg_tokens=2)).eval()
    with torch.no_grad():
        assert torch.equal(again(images), reloaded(images))
    assert (again.rank, again.num_frozen_bases) == (6, 1 if deep else 0)


def test_prompt_init_takes_only_the_random_codes_and_prompt_file_is_refused(tmp_path):
    method = get_method("bpt")
    assert method.initializer(None) == "xavier"
    with pytest.raises(
        ValueError, match=r"bpt initialises its prompts with xavier; .*use spt-shallow or spt-deep"
    ):
        method_settings(tiny_config(tmp_path, tmp_path, "bpt", **{"prompt.init": "sample"}))
    with pytest.raises(ValueError, match=r"drop prompt\.file"):
        method_settings(tiny_config(tmp_path, tmp_path, "bpt", **{"prompt.file": "p.safetensors"}))
    with pytest.raises(ValueError, match=r"set bpt\.deep true"):
        method_settings(tiny_config(tmp_path, tmp_path, "bpt", **{"prompt.deep_layers": 2}))
    _, settings = method_settings(
        tiny_config(tmp_path, tmp_path, "bpt", **{"bpt.deep": True, "prompt.deep_layers": 2})
    )
    assert settings.bpt.deep and settings.deep_layers == 2


def test_prepare_whitens_over_the_init_subset_or_keeps_xavier(tmp_path, images):
    method = get_method("bpt")
    for whitening in (True, False):
        cfg = tiny_config(tmp_path, tmp_path, "bpt", **{"bpt.whitening": whitening, "bpt.eps": 0.0})
        _, settings = method_settings(cfg)
        model = method.create(tiny_vit(), 5, settings)
        start = model.bases.detach().clone()
        method.prepare(method, model, settings, [images], 0)
        assert torch.equal(model.bases, start) != whitening
    ((_, sigma),) = hand_statistics(model.backbone, images, 1)
    basis = BPT(tiny_vit(), 5, num_prompts=4, rank=model.rank, eps=0.0)
    basis.whiten([images])
    b = basis.basis(0).double()
    assert (b.T @ sigma @ b - eye(model.rank)).abs().max() <= TOLERANCE


def test_deep_trains_through_the_engine_and_its_adapter_loads(tmp_path, images):
    """A deep BPT run (the tiny setup, random backbone weights: loaded without the weights check) whitens,
    trains and saves an adapter holding its frozen basis."""
    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(
        data, tmp_path / "run", "bpt", **{"bpt.deep": True, "bpt.trained_bases": 1, "bpt.rank": 8}
    )
    cfg.stage = "final"
    run(cfg, log=quiet)
    adapter = tmp_path / "run" / "seed0" / "final" / "adapter"
    model = sp.load_pretrained(adapter, create_backbone(cfg.model), check_weights=False)
    assert (
        type(model) is BPT and json.loads((adapter / "adapter_config.json").read_text())["model"]["rank"] == 8
    )
    assert model.frozen_bases.shape == (1, 32, 8)  # TINY_BACKBONE: 2 blocks
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


def test_mixed_task_serving_runs_it_through_its_own_model_and_onnx_exports_it_alone(tmp_path, images):
    """Like the other prompt methods with their own forward (vfpt, gapt): a BPT task does not share the
    backbone pass; its logits in a mixed batch are its own model's; one task exports to ONNX, a multi-task
    graph refuses it."""
    ort = pytest.importorskip("onnxruntime")
    zoo = "vit_mini_patch4_32.mae_fmnist"
    torch.manual_seed(0)
    bpt = BPT(
        create_backbone(ModelConfig(backbone=zoo)), 3, num_prompts=4, rank=6, deep=True, trained_bases=1
    )
    bpt.whiten([images])
    bpt.save_pretrained(tmp_path / "bpt")
    sp.PromptedViT(create_backbone(ModelConfig(backbone=zoo)), 4, num_prompts=2).save_pretrained(
        tmp_path / "vpt"
    )
    multi = load_multitask({"bpt": tmp_path / "bpt", "vpt": tmp_path / "vpt"})
    assert not multi.tasks["bpt"].shared
    tasks = ["bpt", "vpt", "bpt", "vpt", "bpt", "bpt"]
    with torch.no_grad():
        rows = multi(images, tasks)
        own = multi.tasks["bpt"].model(images)
    for i, task in enumerate(tasks):
        if task == "bpt":
            torch.testing.assert_close(rows[i], own[i])
    with pytest.raises(ValueError, match="export them one by one"):
        MultiTaskGraph(multi)
    output = tmp_path / "bpt.onnx"
    assert main(["export", str(tmp_path / "bpt"), "--format", "onnx", "--output", str(output)]) == 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (got - own).abs().max().item() <= 1e-4 * max(1.0, own.abs().max().item())


def test_get_model_takes_its_settings_by_name_and_whitens_from_init_data(images):
    model = sp.get_model(tiny_vit(), "bpt", 5, deep=True, rank=6, num_prompts=3, eps=0.0, init_data=[images])
    assert (type(model), model.codes.shape, model.num_frozen_bases) == (BPT, (3, 3, 6), 0)
    for layer, (_, sigma) in enumerate(hand_statistics(model.backbone, images, 3)):
        basis = model.basis(layer).double()
        assert (basis.T @ sigma @ basis - eye(6)).abs().max() <= TOLERANCE
