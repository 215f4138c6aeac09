"""IPT (docs/methods.md, IPT): instance-wise prompts, relevance-weighted or picked from a vocabulary."""

import math
import re

import selfprompt as sp
from selfprompt import PromptedViT
from selfprompt.cli import main
from selfprompt.engine.build import method_settings
from selfprompt.methods import get_method
from selfprompt.methods.ipt import IPT, choose_prototypes
from selfprompt.methods.prompt import PromptRunSettings
from selfprompt.serving import MultiTaskViT

import pytest
import timm
import torch
from conftest import tiny_vit
from engine_helpers import LIST_SPLITS, make_dataset, tiny_config
from prompt_method_checks import (
    assert_rows_are_tokens,
    check_round_trip,
    check_trains_exactly,
    patch_tokens,
    vit_base_count,
)

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]
PLACEMENTS = [{"deep": True}, {"deep": False}, {"deep": True, "deep_layers": 2}]
RECIPE = "src/selfprompt/apps/recipes/vtab_mini/ipt.yaml"


def layer0_patches(model: IPT, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens entering block 0 (tiny_vit: norm_pre is the identity)."""
    bb = model.backbone
    return bb.norm_pre(bb._pos_embed(bb.patch_embed(images)))[:, model.num_prefix_tokens :]


def entering_block0(model: IPT, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


# --- (b) relevance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_relevance_at_equal_relevance_is_vpt_with_the_same_prompts(images, backbone, placement):
    """query = 0: every score is 0, every weight M * (1/M) = 1, so the prompts are P, as in VPT."""
    ipt = IPT(tiny_vit(**backbone), 5, num_prompts=4, form="relevance", **placement).eval()
    vpt = PromptedViT(tiny_vit(**backbone), 5, num_prompts=4, **placement).eval()
    assert not ipt.query.any()
    with torch.no_grad():
        ipt.prompts.add_(torch.randn_like(ipt.prompts))
        vpt.prompts.copy_(ipt.prompts)
        vpt.head.load_state_dict(ipt.head.state_dict())
        torch.testing.assert_close(ipt(images), vpt(images))  # float32 rounding of M * (1/M)
    assert torch.equal(entering_block0(ipt, images), entering_block0(vpt, images))
    with torch.no_grad():
        ipt.query.normal_()
    inserted = entering_block0(ipt, images)[:, ipt.num_prefix_tokens : ipt.num_prefix_tokens + 4]
    assert (inserted - vpt.prompts[0]).abs().max() > 0.1, "a query re-weights the prompts"


def test_relevance_weights_are_m_times_the_softmax_of_the_scaled_scores(images):
    model = IPT(tiny_vit(), 5, num_prompts=3, form="relevance", dropout=0.0).eval()
    with torch.no_grad():
        model.query.normal_()
        patches = layer0_patches(model, images)
        p, d = model.prompts[0], model.embed_dim
        scores = (patches.mean(dim=1) * model.query[0]) @ p.T / math.sqrt(d)
        expected = 3 * torch.softmax(scores, dim=-1)[..., None] * p
        torch.testing.assert_close(model.instance_prompts(0, patches), expected)
        inserted = entering_block0(model, images)[:, 1:4]
        torch.testing.assert_close(inserted, expected)


# --- (a) vocabulary --------------------------------------------------------------------------------------

VOCABULARY = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])
#: Image 0: three tokens nearest prototype 1, two nearest 0 (closest at 0.5) and two nearest 2 (closest at
#: 1), none nearest 3 (9 away) or 4 (6.4 away). Image 1: two nearest 3, one nearest 4; 2 is 6.93 away, 0 and
#: 1 both sqrt(52.04): the index decides.
TOKENS = torch.tensor(
    [
        [[9.0, 0.0], [10.0, 1.0], [11.0, 0.0], [0.0, 0.5], [-3.0, 0.0], [0.0, 9.0], [1.0, 10.0]],
        [[10.0, 10.0], [9.0, 9.0], [5.0, 5.2], [10.0, 10.0], [9.0, 9.0], [5.0, 5.2], [10.5, 10.0]],
    ]
)


def test_vocabulary_picks_the_most_assigned_prototypes_ties_by_distance_then_index():
    assert choose_prototypes(TOKENS, VOCABULARY, 5).tolist() == [[1, 0, 2, 4, 3], [3, 4, 2, 0, 1]]
    assert choose_prototypes(TOKENS, VOCABULARY, 2).tolist() == [[1, 0], [3, 4]]


def test_vocabulary_model_inserts_the_documented_prototypes(images):
    """Prototype 0 at the mean of image 0's tokens takes every token; the others, placed 100, 300 and 200
    away from it along three axes, follow by distance: [0, 1, 3, 2], entering block 0 as they are."""
    model = IPT(tiny_vit(), 5, num_prompts=4, form="vocabulary", vocabulary_size=4, dropout=0.0).eval()
    image = images[:1]
    with torch.no_grad():
        centre = layer0_patches(model, image)[0].mean(dim=0)
        axes = torch.eye(model.embed_dim)[:3] * torch.tensor([[100.0], [300.0], [200.0]])
        model.prompts[0].copy_(torch.cat([centre[None], centre + axes]))
        inserted = entering_block0(model, image)[0, 1:5]
    torch.testing.assert_close(inserted, model.prompts[0, [0, 1, 3, 2]].detach())


def test_vocabulary_refinement_starts_as_the_identity_and_then_refines(images):
    model = IPT(tiny_vit(), 5, num_prompts=2, form="vocabulary", vocabulary_size=6).eval()
    patches = layer0_patches(model, images)
    with torch.no_grad():
        chosen = model.prompts[0][choose_prototypes(patches, model.prompts[0], 2)]
        assert torch.equal(model.instance_prompts(0, patches), chosen)
        model.refine_up.weight.normal_()
        refined = chosen + model.refine_up(torch.nn.functional.gelu(model.refine_down(chosen)))
        torch.testing.assert_close(model.instance_prompts(0, patches), refined)


# --- shapes, training, saving ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relevance", "vocabulary"])
@pytest.mark.parametrize(("placement", "layers"), [({"deep": True}, 3), ({"deep": False}, 1)])
def test_shapes(images, form, placement, layers):
    model = IPT(tiny_vit(), 5, num_prompts=4, form=form, vocabulary_size=7, **placement).eval()
    table = 4 if form == "relevance" else 7
    assert model.prompts.shape == (layers, table, 32) and model.num_prompt_layers == layers
    seen = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    with torch.no_grad():
        assert model(images).shape == (len(images), 5)
    assert seen == [(len(images), 1 + 4 + 64, 32)] * 3


@pytest.mark.parametrize("form", ["relevance", "vocabulary"])
def test_shallow_is_one_deep_layer(images, form):
    """The recipe's shallow: ``prompt.deep_layers: 1``, the layout of IPT(deep=False)."""
    built = sp.get_model(tiny_vit(), "ipt", 5, num_prompts=3, deep_layers=1, form=form, vocabulary_size=6)
    shallow = IPT(tiny_vit(), 5, num_prompts=3, deep=False, form=form, vocabulary_size=6)
    assert built.num_prompt_layers == shallow.num_prompt_layers == 1
    shallow.load_state_dict(built.state_dict())
    with torch.no_grad():
        assert torch.equal(built.eval()(images), shallow.eval()(images))


def test_relevance_trains_prompts_query_and_head(images):
    model = IPT(tiny_vit(), 5, num_prompts=4, form="relevance")
    check_trains_exactly(model, {"prompts", "query", "head.weight", "head.bias"}, images)


MLP = {"refine_down.weight", "refine_down.bias", "refine_up.weight", "refine_up.bias"}


def test_vocabulary_trains_the_chosen_prototypes_the_mlp_and_head(images):
    """At the start ``up`` is zero, so ``down`` gets no gradient yet; once ``up`` moved, every part does, and
    in the vocabulary only the rows some image chose."""
    fresh = IPT(tiny_vit(), 5, num_prompts=2, form="vocabulary", vocabulary_size=16, deep=False, dropout=0.0)
    torch.nn.functional.cross_entropy(fresh(images), torch.arange(len(images)) % 5).backward()
    reached = {n for n, p in fresh.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"prompts", "refine_up.weight", "refine_up.bias", "head.weight", "head.bias"}
    model = IPT(tiny_vit(), 5, num_prompts=2, form="vocabulary", vocabulary_size=16, deep=False, dropout=0.0)
    with torch.no_grad():
        model.refine_up.weight.normal_(std=0.1)
    check_trains_exactly(model, {"prompts", *MLP, "head.weight", "head.bias"}, images)
    chosen = set(choose_prototypes(layer0_patches(model, images), model.prompts[0], 2).flatten().tolist())
    moved = set(model.prompts.grad[0].abs().sum(dim=1).nonzero().flatten().tolist())
    assert moved == chosen and len(chosen) < 16


@pytest.mark.parametrize("form", ["relevance", "vocabulary"])
def test_round_trip(images, tmp_path, form):
    model = IPT(tiny_vit(reg_tokens=2), 5, num_prompts=3, form=form, vocabulary_size=5, hidden=8)
    reloaded = check_round_trip(model, images, tmp_path, reg_tokens=2)
    assert (reloaded.config.form, reloaded.config.vocabulary_size, reloaded.config.hidden) == (form, 5, 8)
    again = IPT.from_pretrained(tmp_path, tiny_vit(reg_tokens=2)).eval()
    with torch.no_grad():
        assert torch.equal(again(images), reloaded(images))


def test_trainable_parameters_of_vit_base_with_100_classes():
    assert vit_base_count("ipt") == 12 * 10 * 768 + 12 * 768 + 76_900 == 178_276
    mlp = 768 * 64 + 64 + 64 * 768 + 768
    assert vit_base_count("ipt", form="vocabulary") == 12 * 64 * 768 + mlp + 76_900 == 765_860


# --- initialisation --------------------------------------------------------------------------------------


def test_the_default_init_is_spts_kmeans():
    assert get_method("ipt").default_init == "kmeans"


def test_spt_init_of_relevance_prompts_is_spt_deeps(images):
    model = IPT(tiny_vit(), 5, num_prompts=4, form="relevance")
    method = get_method("ipt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    for layer in range(3):
        assert_rows_are_tokens(model.prompts[layer].detach(), patch_tokens(model.backbone, images, layer))


def test_spt_init_of_the_vocabulary_is_from_the_tokens_it_is_compared_with(images):
    """K prototypes per layer from the patch tokens entering each block (layer 0: after the position
    embedding, where they are read)."""
    model = IPT(tiny_vit(), 5, num_prompts=2, form="vocabulary", vocabulary_size=6)
    method = get_method("ipt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    assert model.prompts.shape == (3, 6, 32)
    sources = [layer0_patches(model, images), *(patch_tokens(model.backbone, images, k) for k in (1, 2))]
    for layer, tokens in enumerate(sources):
        assert_rows_are_tokens(model.prompts[layer].detach(), tokens)
    before = model.prompts.detach().clone()
    method.prepare(method, model, PromptRunSettings(), [images], 0)  # kmeans: centres, not tokens
    assert model.prompts.shape == before.shape and not torch.equal(model.prompts, before)


def test_init_prompts_on_a_vocabulary_says_to_go_through_the_method(images):
    model = IPT(tiny_vit(), 5, num_prompts=2, form="vocabulary", vocabulary_size=6)
    with pytest.raises(ValueError, match=r"holds 6 rows per layer for its 2 prompts.*init_data=loader"):
        sp.init_prompts(model, [images], "sample")


def test_settings_are_checked_up_front(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, "ipt", **{"ipt.form": "vocabulary", "ipt.vocabulary_size": 3})
    with pytest.raises(ValueError, match=r"vocabulary_size \(3\) must be at least prompt.num_prompts \(4\)"):
        method_settings(cfg)
    cfg.ipt.vocabulary_size, cfg.prompt.init = 8, "vipamin"
    with pytest.raises(ValueError, match=r"ipt\.form vocabulary with prompt\.init='vipamin'"):
        method_settings(cfg)
    cfg.ipt.form = "relevance"
    method_settings(cfg)
    with pytest.raises(ValueError, match=r"ipt\.form must be one of relevance, vocabulary"):
        IPT(tiny_vit(), 5, form="words")


# --- CLI and serving -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["vocabulary"])  # relevance: tests/test_methods.py trains the recipe as is
def test_selfprompt_train_end_to_end(form, tmp_path, images):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    splits = [a for k, v in LIST_SPLITS.items() for a in (f"--data.{k}", v)]
    argv = ["train", RECIPE, "--data.root", str(data), *splits, "--ipt.form", form,
            "--ipt.vocabulary_size", "16", "--data.batch_size", "8", "--data.eval_batch_size", "16",
            "--data.num_workers", "0", "--optim.epochs", "1", "--stage", "final",
            "--output_dir", str(out), "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    backbone = timm.create_model("vit_mini_patch4_32.mae_fmnist", pretrained=True, num_classes=0)
    model = sp.load_pretrained(out / "seed0" / "final" / "adapter", backbone).eval()
    assert type(model) is IPT and model.config.form == form and model.prompts.shape[1] == 16
    with torch.no_grad():
        assert model(images).shape == (len(images), 3)


def test_served_unshared_each_row_as_its_own_model(images, tmp_path):
    """Per-row prompts do not fit the server's static prompt bank: IPT tasks run through their own model."""
    folders = {}
    for form in ("relevance", "vocabulary"):
        model = IPT(tiny_vit(), 4, num_prompts=3, form=form, vocabulary_size=6)
        with torch.no_grad():
            for p in model.adapter_parameters().values():
                p.add_(0.1 * torch.randn_like(p))
        folders[form] = model.save_pretrained(tmp_path / form)
    vpt = PromptedViT(tiny_vit(), 3, num_prompts=2)
    folders["vpt"] = vpt.save_pretrained(tmp_path / "vpt")
    multi = MultiTaskViT(tiny_vit())
    for name, folder in folders.items():
        multi.add_adapter(name, folder)
    assert {n: t.shared for n, t in multi.tasks.items()} == {
        "relevance": False,
        "vocabulary": False,
        "vpt": True,
    }
    tasks = ["relevance", "vpt", "vocabulary", "relevance", "vocabulary", "vpt", "vocabulary", "relevance"]
    images = torch.cat([images, images[:2].flip(-1)])
    rows = multi(images, tasks)
    singles = {n: sp.load_pretrained(f, tiny_vit()).eval() for n, f in folders.items()}
    with torch.no_grad():
        for i, (task, row) in enumerate(zip(tasks, rows, strict=True)):
            torch.testing.assert_close(row, singles[task](images[i : i + 1])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["relevance", "vocabulary"])
def test_one_task_exports_to_onnx_and_a_multitask_graph_refuses_it(form, tmp_path, capsys):
    """The choice (distances, counts, one distinct key per prototype, TopK) exports with a dynamic batch."""
    ort = pytest.importorskip("onnxruntime")
    zoo = "vit_mini_patch4_32.mae_fmnist"
    model = IPT(timm.create_model(zoo, pretrained=True, num_classes=0), 4, num_prompts=3, form=form)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    folder, output = model.save_pretrained(tmp_path / "ipt"), tmp_path / "ipt.onnx"
    assert main(["export", str(folder), "--format", "onnx", "--output", str(output)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    model.eval()
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        assert (got - expected).abs().max().item() <= 1e-4
    argv = ["export", f"a={folder}", f"b={folder}", "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
    assert main(argv) != 0
    assert re.search(r"run through their own models.*export them one by one", capsys.readouterr().err)
