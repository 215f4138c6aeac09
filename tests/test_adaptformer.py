"""AdaptFormer: the parallel adapter reads the un-normalised residual stream after attention, starts at zero
(the model equals the frozen backbone), only adapters and head train, and the adapter round-trips."""

import copy

import selfprompt as sp
from selfprompt.methods.adaptformer import AdaptFormer
from selfprompt.model import ViTClassifier

import pytest
import torch
from conftest import FP32_ATOL, tiny_vit

BACKBONES = {"cls": {}, "registers_no_cls": {"class_token": False, "reg_tokens": 2, "global_pool": "avg"}}


@pytest.mark.parametrize("kind", BACKBONES)
def test_adaptformer_starts_exactly_at_the_frozen_backbone(kind, images):
    torch.manual_seed(0)
    linear = ViTClassifier(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    torch.manual_seed(0)
    model = AdaptFormer(tiny_vit(**BACKBONES[kind]), num_classes=5).eval()
    for adapter in model.adapters:
        assert not adapter.up.weight.any() and not adapter.up.bias.any() and not adapter.down.bias.any()
        assert adapter.down.weight.std() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(images), linear(images), rtol=0, atol=FP32_ATOL)


def test_the_adapter_reads_the_residual_stream_beside_the_mlp(images):
    """METHODS.md 3: out = x1 + DP(mlp(LN2 x1)) + s * up(drop(relu(down(x1)))), x1 = x + DP(attn(LN1 x))."""
    model = AdaptFormer(tiny_vit(), num_classes=5, bottleneck=4, scale=0.5).eval()
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
        block, adapter = model.backbone.blocks[1], model.adapters[1]
        x = torch.randn(2, 65, 32)
        x1 = x + block.attn(block.norm1(x))
        expected = x1 + block.mlp(block.norm2(x1)) + 0.5 * adapter.up(torch.relu(adapter.down(x1)))
        torch.testing.assert_close(model.forward_block(1, block, x), expected)


def test_adaptformer_trains_exactly_its_adapters_and_the_head(images):
    vit = tiny_vit()
    state = copy.deepcopy(vit.state_dict())
    model = AdaptFormer(vit, num_classes=5, bottleneck=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"adapters.{i}.{m}.{k}" for i in range(3) for m in ("down", "up") for k in ("weight", "bias")}
    assert trainable == expected | {"head.weight", "head.bias"} == set(model.adapter_parameters())
    assert model.num_adapter_parameters() == 3 * (2 * 4 * 32 + 4 + 32) + 32 * 5 + 5
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):  # down's gradient is zero while up is
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), torch.arange(6) % 5).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert not model.backbone.training and model.adapters[0].dropout.training
    assert vit.state_dict().keys() == state.keys(), "no module is added to the backbone"
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())


def test_adaptformer_adapter_round_trips(images, tmp_path):
    model = AdaptFormer(tiny_vit(), num_classes=5, bottleneck=6, scale=0.1, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert type(reloaded) is AdaptFormer
    assert (reloaded.config.bottleneck, reloaded.config.scale) == (6, 0.1)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bottleneck must be an integer >= 1"):
        AdaptFormer(tiny_vit(), num_classes=5, bottleneck=0)
    with pytest.raises(ValueError, match="train_backbone must be False"):
        AdaptFormer(tiny_vit(), num_classes=5, train_backbone=True)
