"""Prompt Condensation (METHODS.md section 9): global ranking, per-layer layouts, the pc method end to end."""

import json

from selfprompt import PromptedViT
from selfprompt.cli import main
from selfprompt.engine.run import run
from selfprompt.methods.condensation.model import CondensedViT, condense, kept_mask, prompt_importance

import pytest
import torch
from conftest import FP32_ATOL, tiny_vit
from engine_helpers import adapter, make_dataset, tiny_config
from prompt_method_checks import check_round_trip, check_trains_exactly
from safetensors.torch import load_file

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


def trained_like(deep: bool = True, num_prompts: int = 4, **backbone) -> PromptedViT:
    """A PromptedViT with random prompts and head, as if trained."""
    model = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=num_prompts, deep=deep).eval()
    with torch.no_grad():
        model.prompts.normal_(generator=torch.Generator().manual_seed(3))
        model.head.weight.normal_(generator=torch.Generator().manual_seed(4))
    return model


def condensed_prompts(folder) -> torch.Tensor:
    return load_file(folder / "adapter.safetensors")["prompts"]


@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_keeping_every_prompt_is_the_source_model(images, backbone, deep):
    source = trained_like(deep, **backbone)
    condensed = condense(source, torch.ones(source.prompts.shape[:2], dtype=torch.bool)).eval()
    assert condensed.layer_counts == [4] * source.num_prompt_layers
    with torch.no_grad():
        torch.testing.assert_close(condensed(images), source(images), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_block_sees_its_own_kept_prompts(images, backbone):
    """Layer 1 keeps none: block 1 sees no prompts, block 2 its own three (left out by avg pooling)."""
    source = trained_like(**backbone)
    mask = torch.tensor([[True, False, False, True], [False] * 4, [False, True, True, True]])
    condensed = condense(source, mask).eval()
    assert condensed.layer_counts == [2, 0, 3] and condensed.num_extra_tokens == 3
    seen = []
    for block in condensed.backbone.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        condensed(images)
    p = condensed.num_prefix_tokens
    for layer, x in enumerate(seen):
        count = condensed.layer_counts[layer]
        assert x.shape[1] == p + count + 64
        assert torch.equal(x[0, p : p + count], source.prompts[layer][mask[layer]])


def test_importance_is_the_summed_first_order_term(images):
    """s = sum over batches |<dL/dp, p>|, by hand on two batches; an all-zero prompt scores 0."""
    model = trained_like()
    with torch.no_grad():
        model.prompts[1, 2].zero_()
    labels = torch.arange(len(images)) % 5
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for x, y in batches:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        expected += (model.prompts.grad * model.prompts).sum(-1).abs().double()
    scores = prompt_importance(model, batches)
    torch.testing.assert_close(scores, expected)
    assert scores[1, 2] == 0 and (scores > 0).sum() == 11
    assert prompt_importance(model, batches, max_batches=1).sum() < scores.sum()


def test_ranking_is_global_with_the_stated_ties():
    scores = torch.tensor([[3.0, 1.0, 0.5], [3.0, 5.0, 0.0]])
    # round(0.5 * 6) = 3: 5 (layer 1), then the tie at 3 in layer order
    assert kept_mask(scores, 0.5).tolist() == [[True, False, False], [True, True, False]]
    assert kept_mask(scores, 0.34).tolist() == [[True, False, False], [False, True, False]]
    assert kept_mask(scores, 0.01).sum() == 1  # at least one survives
    assert kept_mask(scores, 1.0).all()
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match=r"keep must be the share of prompts to keep, in \(0, 1\]"):
            kept_mask(scores, bad)


def test_exactly_the_kept_prompts_and_the_head_train_and_round_trip(images, tmp_path):
    source = trained_like()
    mask = torch.tensor([[True, False, False, True], [False] * 4, [False, True, True, True]])
    condensed = condense(source, mask)
    assert condensed.num_adapter_parameters() == 5 * 32 + 5 * 32 + 5
    check_trains_exactly(condensed, {"prompts", "head.weight", "head.bias"}, images)
    reloaded = check_round_trip(condensed, images, tmp_path)
    assert reloaded.layer_counts == [2, 0, 3]


@pytest.mark.parametrize(
    "counts, match",
    [([], "at least one prompt"), ([0, 0], "at least one prompt"), ([1, -1], ">= 0"), ([1] * 4, "3 blocks")],
)
def test_bad_layouts_are_refused(counts, match):
    with pytest.raises(ValueError, match=match):
        CondensedViT(tiny_vit(), num_classes=5, layer_counts=counts)


def test_condense_then_fine_tune_end_to_end(tmp_path, capsys):
    """vpt-deep -> selfprompt condense --keep 0.5 -> pc: the kept half trains; the record says what was kept;
    condensing again reuses the folder; bad inputs get messages."""
    data = make_dataset(tmp_path / "data")
    source = tmp_path / "vpt"
    run(tiny_config(data, source, method="vpt-deep", **{"seeds": [0]}))
    condensed = tmp_path / "condensed"
    assert main(["condense", str(source), "--keep", "0.5", "--output", str(condensed)]) == 0
    record = json.loads((condensed / "condensation.json").read_text())
    assert record["prompts_before"] == 8 and record["prompts_kept"] == 4 and sum(record["layer_counts"]) == 4
    kept = torch.tensor(record["kept"], dtype=torch.bool)
    assert kept.tolist() == kept_mask(torch.tensor(record["scores"]), 0.5).tolist()
    assert torch.equal(adapter(source)["prompts"][kept], condensed_prompts(condensed))
    assert main(["condense", str(source), "--keep", "0.5", "--output", str(condensed)]) == 0
    assert "reused" in capsys.readouterr().out

    pc = {"condense.adapter": str(condensed), "stage": "final"}
    result = run(tiny_config(data, tmp_path / "pc", method="pc", **pc))
    final = adapter(tmp_path / "pc")
    assert final["prompts"].shape == (4, 32) and not torch.equal(
        final["prompts"], condensed_prompts(condensed)
    )
    assert result["trainable_parameters"] == 4 * 32 + 3 * 32 + 3

    # SPT's initialisation enters through stage 1: an spt-deep run condenses the same way
    spt = tmp_path / "spt"
    run(tiny_config(data, spt, method="spt-deep", **{"stage": "final"}))
    assert main(["condense", str(spt), "--keep", "0.25", "--output", str(tmp_path / "spt-condensed")]) == 0
    spt_record = json.loads((tmp_path / "spt-condensed" / "condensation.json").read_text())
    assert spt_record["method"] == "spt-deep" and spt_record["prompts_kept"] == 2

    with pytest.raises(ValueError, match="selfprompt condense RUN --keep"):
        run(tiny_config(data, tmp_path / "pc-none", method="pc"))
    with pytest.raises(ValueError, match=r"track\.every: pc's prompt count differs per layer"):
        run(tiny_config(data, tmp_path / "pc-track", method="pc", **pc, **{"track.every": 1}))
    with pytest.raises(ValueError, match=r"scored from a model trained on train\+val, so a tune stage"):
        run(tiny_config(data, tmp_path / "pc-both", method="pc", **{**pc, "stage": "both"}))
    linear = tmp_path / "linear"
    run(tiny_config(data, linear, method="linear"))
    assert main(["condense", str(linear), "--output", str(tmp_path / "x")]) == 1
    assert main(["condense", str(source), "--keep", "0", "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "condense a vpt-deep or spt-deep run" in err and "keep must be the share" in err
