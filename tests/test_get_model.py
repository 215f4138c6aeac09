"""`selfprompt.get_model`: any registered method from Python keywords, with the CLI's defaults, checks and
pooling; `Method.create` with the defaults."""

import contextlib
import warnings

import selfprompt as sp
from selfprompt.config import TrainConfig
from selfprompt.engine.build import build_model
from selfprompt.init import init_prompts
from selfprompt.methods.vfpt import VFPTSettings

import pytest
import torch
from conftest import tiny_vit

BUILT_ALONE = [m for m in sp.method_names() if m != "pc"]  # pc fine-tunes a condensed adapter


@contextlib.contextmanager
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b) and a.config == b.config
    pairs = zip(a.adapter_parameters().items(), b.adapter_parameters().items(), strict=True)
    for (name, mine), (other, theirs) in pairs:
        assert name == other and torch.equal(mine, theirs), name


@pytest.mark.parametrize("method", BUILT_ALONE)
def test_get_model_builds_what_the_cli_builds_without_a_recipe(method):
    cfg = TrainConfig()
    cfg.model.method = method
    by_cli = build_model(cfg, tiny_vit(), 5)  # tiny_vit seeds torch: the heads draw the same values
    needs_images = sp.get_method(method).default_init not in (None, "xavier")
    with pytest.warns(UserWarning, match="init_data=loader") if needs_images else no_warning():
        same_model(sp.get_model(tiny_vit(), method, num_classes=5), by_cli)
    same_model(sp.get_method(method).create(tiny_vit(), 5), by_cli)


def test_settings_by_keyword_or_by_section():
    model = sp.get_model(tiny_vit(), "lora", 5, rank=4, targets=["qkv", "mlp.fc1"])
    assert (model.config.rank, model.config.targets) == (4, ("qkv", "mlp.fc1"))
    vfpt = sp.get_model(tiny_vit(), "vfpt", 5, num_prompts=6, fourier_share=0.5)
    by_section = sp.get_model(
        tiny_vit(), "vfpt", 5, prompt={"num_prompts": 6}, vfpt=VFPTSettings(fourier_share=0.5)
    )
    assert vfpt.config == by_section.config and (vfpt.num_prompts, vfpt.num_fourier) == (6, 3)
    assert sp.get_model(tiny_vit(), "vpt-deep", 5).num_prompts == 20  # the CLI's (official README's) default
    assert sp.get_model(tiny_vit(), "vpt-shallow", 5).num_prompts == 100


@pytest.mark.parametrize(
    ("method", "settings", "error", "message"),
    [
        ("lora", {"rank": 0}, ValueError, r"get_model\('lora'\): lora\.rank must be an integer >= 1, got 0"),
        ("lora", {"rnak": 4}, TypeError, r"setting 'rnak' is unknown; its settings: \{'lora': \['alpha'"),
        ("spt-deep", {"rank": 4}, TypeError, r"setting 'rank' is unknown; its settings: \{'prompt'"),
        ("spt-deep", {"dropout": 1.0}, ValueError, r"prompt\.dropout must be in \[0, 1\), got 1\.0"),
        ("spt-deep", {"deep_layers": 9}, ValueError, r"prompt\.deep_layers must be in \[1, 3\]"),
        (
            "gapt",
            {"gate_init": float("nan")},
            ValueError,
            r"gapt\.gate_init must be a finite number, got nan",
        ),
        ("vfpt", {"fourier_share": 1.0, "init": "sample"}, ValueError, "every prompt is a Fourier prompt"),
        ("linear", {"num_prompts": 4}, TypeError, r"setting 'num_prompts' is unknown; its settings: none"),
        ("spt-deep", {"prompt": {"rank": 4}}, TypeError, r"prompt has no setting 'rank'"),
        ("pc", {}, ValueError, "pass --condense.adapter DIR"),
        ("nope", {}, ValueError, r"Unknown method 'nope'; methods: linear, full"),
    ],
)
def test_bad_settings_are_refused_as_the_cli_refuses_them(method, settings, error, message):
    with pytest.raises(error, match=message):
        sp.get_model(tiny_vit(), method, 5, **settings)


def test_init_data_prepares_the_prompts_as_the_method_does(images):
    model = sp.get_model(tiny_vit(), "spt-deep", 5, num_prompts=4, init="kmeans", init_data=[images], seed=3)
    with pytest.warns(UserWarning, match=r"selfprompt\.init_prompts\(model, loader, 'kmeans'\)"):
        expected = sp.get_model(tiny_vit(), "spt-deep", 5, num_prompts=4, init="kmeans")
    init_prompts(expected, [images], "kmeans", seed=3)
    assert torch.equal(model.prompts, expected.prompts)
    xavier = sp.get_model(tiny_vit(), "vpt-deep", 5, num_prompts=4)
    assert not torch.equal(model.prompts, xavier.prompts)


def test_pooling_follows_the_weights_family_as_the_cli_does():
    mae = tiny_vit()
    mae.pretrained_cfg = {"architecture": "vit_tiny_patch16_224", "tag": "mae"}
    assert sp.get_model(mae, "spt-deep", 5, init_data=[torch.zeros(1, 3, 32, 32)]).config.pool == "mae"
    assert sp.PromptedViT(mae, 5).config.pool == "mae"
    assert sp.PromptedViT(mae, 5, pool="token").config.pool == "token"
    assert sp.get_model(tiny_vit(), "linear", 5).config.pool == "token"
