"""VFPT (METHODS.md section 7): VPT-deep with a Fourier share of each layer's prompts."""

import math

from selfprompt import PromptedViT
from selfprompt.engine.build import method_settings
from selfprompt.methods import get_method
from selfprompt.methods.prompt import PromptRunSettings
from selfprompt.methods.vfpt import VFPT, fourier_prompts

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import tiny_config
from prompt_method_checks import (
    assert_rows_are_tokens,
    check_round_trip,
    check_trains_exactly,
    patch_tokens,
)

BACKBONES = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


def test_transform_is_the_real_part_of_the_unnormalised_2d_dft():
    """A 2 x 3 case by the DFT's definition: X[k, l] = sum_{n, d} p[n, d] exp(-2 pi i (k n / 2 + l d / 3))."""
    p = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for k in range(2):
        for col in range(3):
            for n in range(2):
                for d in range(3):
                    expected[k, col] += p[n, d].item() * math.cos(2 * math.pi * (k * n / 2 + col * d / 3))
    torch.testing.assert_close(fourier_prompts(p).double(), expected)
    assert fourier_prompts(p)[0, 0] == p.sum()  # the DC term: unnormalised
    q = torch.randn(4, 5, 6)
    torch.testing.assert_close(fourier_prompts(q), torch.fft.fft2(q).real)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_without_fourier_prompts_it_is_vpt_deep(images, backbone):
    vfpt = VFPT(tiny_vit(**backbone), num_classes=5, num_prompts=4, fourier_share=0.0).eval()
    vpt = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=4, deep=True).eval()
    with torch.no_grad():
        vpt.prompts.copy_(vfpt.prompts)
        vpt.head.load_state_dict(vfpt.head.state_dict())
        assert torch.equal(vfpt(images), vpt(images))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fourier_prompts_come_first_then_the_plain_ones(images, backbone):
    """floor(0.5 * 5) = 2 Fourier prompts per layer: VPT-deep whose prompts are [FFT2(P[:2]), P[2:]]."""
    vfpt = VFPT(tiny_vit(**backbone), num_classes=5, num_prompts=5, fourier_share=0.5).eval()
    assert vfpt.num_fourier == 2
    vpt = PromptedViT(tiny_vit(**backbone), num_classes=5, num_prompts=5, deep=True).eval()
    with torch.no_grad():
        effective = torch.cat([torch.fft.fft2(vfpt.prompts[:, :2]).real, vfpt.prompts[:, 2:]], dim=1)
        vpt.prompts.copy_(effective)
        vpt.head.load_state_dict(vfpt.head.state_dict())
        torch.testing.assert_close(vfpt(images), vpt(images))


def test_exactly_the_prompts_and_head_train(images):
    model = VFPT(tiny_vit(), num_classes=5, num_prompts=4, fourier_share=0.5)
    check_trains_exactly(model, {"prompts", "head.weight", "head.bias"}, images)


def test_round_trip(images, tmp_path):
    model = VFPT(tiny_vit(reg_tokens=2), num_classes=5, num_prompts=4, fourier_share=0.75)
    reloaded = check_round_trip(model, images, tmp_path, reg_tokens=2)
    assert (reloaded.config.fourier_share, reloaded.num_fourier) == (0.75, 3)


def test_spt_init_fills_the_plain_share_from_patch_tokens(images):
    model = VFPT(tiny_vit(), num_classes=5, num_prompts=4, fourier_share=0.5)
    method = get_method("vfpt")
    method.prepare(method, model, PromptRunSettings(init="sample"), [images], 0)
    for layer in range(3):
        assert_rows_are_tokens(model.prompts[layer, 2:], patch_tokens(model.backbone, images, layer))
    assert model.prompts[:, :2].abs().max() <= model.xavier_bound(), "the Fourier share stays xavier"


def test_all_fourier_prompts_refuse_a_token_initializer(tmp_path, images):
    cfg = tiny_config(tmp_path, tmp_path, "vfpt", **{"prompt.init": "sample", "vfpt.fourier_share": 1.0})
    with pytest.raises(ValueError, match=r"every prompt is a Fourier prompt.*lower vfpt\.fourier_share"):
        method_settings(cfg)
    cfg.prompt.init = "xavier"
    method_settings(cfg)
    model, method = VFPT(tiny_vit(), num_classes=5, num_prompts=4, fourier_share=1.0), get_method("vfpt")
    with pytest.raises(ValueError, match="every prompt is a Fourier prompt"):
        method.prepare(method, model, PromptRunSettings(init="kmeans"), [images], 0)
