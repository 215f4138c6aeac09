"""Adapter checkpoints: safetensors + JSON, reloaded to identical logits, mismatched backbones refused."""

import json

from selfprompt import PromptedViT, ViTClassifier, init_prompts, load_pretrained

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_prompts=3), dict(num_prompts=2, deep=True, deep_layers=2, pool="mae", dropout=0.1)],
)
def test_save_reload_gives_identical_logits(tmp_path, images, kwargs):
    model = PromptedViT(tiny_vit(), num_classes=5, **kwargs).eval()
    init_prompts(model, [images], "sample")
    torch.nn.init.normal_(model.head.weight)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",  # the model card
        "adapter.safetensors",
        "adapter_config.json",
    ]
    assert set(load_file(tmp_path / "adapter" / "adapter.safetensors")) == {
        "prompts",
        "head.weight",
        "head.bias",
    }
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["model"]["num_classes"] == 5 and config["backbone"]["depth"] == 3
    assert {"selfprompt", "torch", "timm"} <= set(config["versions"])

    reloaded = PromptedViT.from_pretrained(tmp_path / "adapter", backbone=tiny_vit()).eval()
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_adapter_is_small(tmp_path):
    model = PromptedViT(tiny_vit(), num_classes=10, num_prompts=8, deep=True)
    model.save_pretrained(tmp_path)
    backbone_bytes = sum(p.numel() * 4 for p in model.backbone.parameters())
    assert (tmp_path / "adapter.safetensors").stat().st_size < 0.1 * backbone_bytes


@pytest.mark.parametrize(
    "other, field",
    [
        (dict(depth=4), "depth"),
        (dict(embed_dim=48), "embed_dim"),
        (dict(patch_size=8), "patch_size"),
        (dict(reg_tokens=1), "num_prefix_tokens"),
    ],
)
def test_mismatched_backbone_is_refused(tmp_path, other, field):
    PromptedViT(tiny_vit(), num_classes=5, num_prompts=3).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=f"does not match the adapter(.|\n)*{field}: the adapter was trained"
    ):
        PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit(**other))


def test_backbone_name_is_recorded_and_checked(tmp_path):
    PromptedViT(tiny_vit(), num_classes=5, backbone_name="mae_tiny").save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"name: the adapter was trained with 'mae_tiny'(.|\n)*backbone_name="
    ):
        PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit())
    loaded = PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit(), backbone_name="mae_tiny")
    assert loaded.backbone_name == "mae_tiny"


def test_timm_names_are_recorded(tmp_path):
    import timm

    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)
    model = PromptedViT(backbone, num_classes=2, num_prompts=1)
    assert model.backbone_name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    model.save_pretrained(tmp_path)
    other = timm.create_model("vit_tiny_patch16_224.augreg_in21k", num_classes=0, depth=2)
    with pytest.raises(ValueError, match="name"):
        PromptedViT.from_pretrained(tmp_path, backbone=other)


def test_incomplete_or_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a selfprompt adapter directory"):
        PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit())
    PromptedViT(tiny_vit(), num_classes=5).save_pretrained(tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit())


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = PromptedViT(tiny_vit(), num_classes=5)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("selfprompt.adapter.save_file", broken_save)
    torch.nn.init.normal_(model.prompts)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == before
    files = ["README.md", "adapter.safetensors", "adapter_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.parametrize("train_backbone", [False, True])
def test_classifier_round_trip_and_class_check(tmp_path, images, train_backbone):
    model = ViTClassifier(tiny_vit(), num_classes=4, train_backbone=train_backbone).eval()
    if train_backbone:  # a fine-tuned backbone is part of the artefact
        torch.nn.init.normal_(model.backbone.blocks[0].mlp.fc1.weight)
    model.save_pretrained(tmp_path)
    reloaded = load_pretrained(tmp_path, backbone=tiny_vit()).eval()
    assert type(reloaded) is ViTClassifier
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    with pytest.raises(ValueError, match="holds a ViTClassifier, not a PromptedViT"):
        PromptedViT.from_pretrained(tmp_path, backbone=tiny_vit())
