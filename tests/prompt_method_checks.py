"""Checks every prompt method's tests share: exactly the intended parameters train, the backbone stays frozen
and in eval mode, adapters round-trip, the ViT-B/16 trainable count, and SPT prompts are source tokens."""

from __future__ import annotations

import selfprompt as sp
from selfprompt.config import TrainConfig
from selfprompt.engine.build import build_model
from selfprompt.model import ViTClassifier

import timm
import torch
from conftest import tiny_vit


def check_trains_exactly(model: ViTClassifier, expected: set[str], images: torch.Tensor) -> None:
    """``expected`` (names) are the trainable parameters and the adapter; a backward pass reaches all of
    them and nothing else; the backbone is frozen and stays in eval mode."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected == set(model.adapter_parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training, "the backbone stays in eval mode"
    classes = model.head.out_features
    torch.nn.functional.cross_entropy(model(images), torch.arange(len(images)) % classes).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == expected


def check_round_trip(model: ViTClassifier, images: torch.Tensor, tmp_path, **backbone) -> ViTClassifier:
    """Perturbed adapter -> save_pretrained -> selfprompt.load_pretrained on a fresh backbone: same class,
    identical logits."""
    model.eval()
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
        expected = model(images)
    model.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, tiny_vit(**backbone)).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded(images), expected)
    return reloaded


def vit_base_count(method: str, **section: object) -> int:
    """Trainable parameters of ``method`` (its defaults plus ``section``) on ViT-B/16 with 100 classes."""
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    cfg = TrainConfig()
    cfg.model.method = method
    for key, value in section.items():
        setattr(getattr(cfg, method), key, value)
    return build_model(cfg, backbone, 100).num_adapter_parameters()


def assert_rows_are_tokens(rows: torch.Tensor, tokens: torch.Tensor, atol: float = 1e-5) -> None:
    """Every row of ``rows`` (n, C) is one of ``tokens`` (..., C), and the rows are distinct tokens."""
    tokens = tokens.reshape(-1, tokens.shape[-1])
    distance, index = torch.cdist(rows.double(), tokens.double()).min(dim=1)
    assert distance.max() <= atol, distance
    assert len(set(index.tolist())) == len(rows), "the prompts are distinct tokens"


def patch_tokens(vit, images: torch.Tensor, layer: int) -> torch.Tensor:
    """SPT's source for deep layer ``layer``: the patch embedding (0) or block layer-1's patch outputs."""
    with torch.no_grad():
        x = vit.patch_embed(images)
        if layer == 0:
            return x
        x = vit.norm_pre(vit._pos_embed(x))
        for block in vit.blocks[:layer]:
            x = block(x)
        return x[:, vit.num_prefix_tokens :]
