"""Only prompts and head train; the backbone stays bit-identical and in eval mode."""

from selfprompt import PromptedViT, ViTClassifier

import pytest
import torch
from conftest import tiny_vit


@pytest.mark.parametrize("deep", [False, True])
def test_optimizer_steps_move_only_prompts_and_head(deep, images):
    backbone = tiny_vit(drop_path_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2)
    model = PromptedViT(backbone, num_classes=4, num_prompts=3, deep=deep, dropout=0.1).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompts", "head.weight", "head.bias"}
    assert set(model.adapter_parameters()) == trainable
    backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    adapter_before = {k: v.detach().clone() for k, v in model.adapter_parameters().items()}
    # all parameters handed to the optimizer, with weight decay: frozen ones must still not move
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    labels = torch.arange(len(images)) % 4
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    for k, v in model.adapter_parameters().items():
        assert not torch.equal(v, adapter_before[k]), k


def test_backbone_stays_in_eval_mode(images):
    backbone = tiny_vit(drop_path_rate=0.5, proj_drop_rate=0.5)
    model = PromptedViT(backbone, num_classes=4, num_prompts=3).train()
    assert model.training and model.head.training
    assert not any(m.training for m in backbone.modules())
    with torch.no_grad():  # no dropout anywhere in the backbone: two training-mode passes agree
        assert torch.equal(model(images), model(images))


def test_linear_probe_trains_only_the_head_and_full_trains_everything(images):
    linear = ViTClassifier(tiny_vit(drop_path_rate=0.5), num_classes=4).train()
    assert {n for n, p in linear.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert not linear.backbone.training
    full = ViTClassifier(tiny_vit(drop_path_rate=0.5), num_classes=4, train_backbone=True).train()
    assert all(p.requires_grad for p in full.parameters())
    assert full.backbone.training and not full.eval().backbone.training
    assert set(full.adapter_parameters()) == {n for n, _ in full.named_parameters()}
