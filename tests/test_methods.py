"""The method registry, the classifier's seams, and BitFit (the first method added through the registry)."""

import copy
import dataclasses

import selfprompt as sp
from selfprompt.apps.bench import RECIPES
from selfprompt.cli import main
from selfprompt.config import TrainConfig, migrate
from selfprompt.engine.build import build_model, method_settings
from selfprompt.methods import get_method, method_names, register_method, settings_sections
from selfprompt.methods.bitfit import BitFit
from selfprompt.methods.registry import backbone_sharing_classes, stage_commands
from selfprompt.model import ViTClassifier, residual_branches

import pytest
import timm
import torch
from conftest import FP32_ATOL, tiny_vit
from engine_helpers import LIST_SPLITS, make_dataset, tiny_config


def test_the_six_original_names_and_bitfit_are_registered_in_order():
    original = ["linear", "full", "vpt-shallow", "vpt-deep", "spt-shallow", "spt-deep"]
    assert method_names()[:7] == [*original, "bitfit"]  # then the later methods (tests/test_<method>.py)
    assert [get_method(n).default_init for n in method_names()[:7]] == [
        None, None, "xavier", "xavier", "sample", "sample", None
    ]  # fmt: skip


def test_only_the_linear_probe_input_prompts_and_apt_share_the_served_backbone_forward():
    sharing = {"linear", "vpt-shallow", "vpt-deep", "spt-shallow", "spt-deep", "apt"}
    assert {n: get_method(n).shares_backbone for n in method_names()} == {
        n: n in sharing for n in method_names()
    }
    assert backbone_sharing_classes() == {"ViTClassifier", "PromptedViT", "APT"}


def test_the_second_stages_are_registered_with_their_methods_and_reach_the_cli():
    commands = {n: [c.name for c in get_method(n).commands] for n in method_names()}
    assert {n: names for n, names in commands.items() if names} == {"e2vpt": ["prune"], "pc": ["condense"]}
    assert [c.name for c in stage_commands()] == ["prune", "condense"]
    from selfprompt.cli import COMMANDS, methods

    assert [c.name for c in methods.COMMANDS] == ["prune", "condense"]
    assert {"prune", "condense"} <= set(COMMANDS)


def test_unknown_and_duplicate_methods_are_refused():
    with pytest.raises(ValueError, match="Unknown method 'lorra'; methods: linear, full"):
        get_method("lorra")
    with pytest.raises(ValueError, match="already registered"):
        register_method("linear", "again", ViTClassifier, lambda *a, **k: None)


def test_initializers_a_method_does_not_take_are_refused_with_the_alternative():
    assert get_method("spt-deep").initializer(None) == "sample"
    assert get_method("spt-deep").initializer("kmeans") == "kmeans"
    assert get_method("vpt-deep").initializer(None) == "xavier"
    with pytest.raises(ValueError, match=r"vpt-deep initialises its prompts with xavier.*use spt-deep"):
        get_method("vpt-deep").initializer("kmeans")
    with pytest.raises(ValueError, match="'bitfit' has no prompts"):
        get_method("bitfit").initializer("sample")


def test_settings_of_a_section_the_method_does_not_read_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, "linear", **{"prompt.num_prompts": 5})
    with pytest.raises(ValueError, match=r"'linear' does not read the prompt settings; drop prompt\.num"):
        method_settings(cfg)


def test_every_section_is_a_train_config_field_with_help():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for section in settings_sections().values():
        assert isinstance(fields[section.name].default_factory(), section.cls)
        assert f"{section.name}: {section.help}" in TrainConfig.__doc__


def test_old_config_layout_migrates_to_the_sections():
    old = {"model": {"method": "vpt-deep", "num_prompts": 3, "prompt_dropout": 0.1, "prompts_file": "p"}}
    cfg = TrainConfig.from_dict(migrate(old))
    assert (cfg.prompt.num_prompts, cfg.prompt.dropout, cfg.prompt.file) == (3, 0.1, "p")
    assert TrainConfig.from_dict(old) == cfg


def test_residual_branches_without_replacement_is_the_block(images):
    vit = tiny_vit()
    x = vit.patch_embed(images)
    for block in vit.blocks:
        torch.testing.assert_close(residual_branches(block, x), block(x), rtol=0, atol=FP32_ATOL)


def test_classifier_seams_default_to_timm(images):
    """With no method, the seams leave timm's forward unchanged (features and logits)."""
    vit = tiny_vit(global_pool="token")
    model = ViTClassifier(vit, num_classes=4)
    with torch.no_grad():
        vit.reset_classifier(4)
        vit.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(model(images), vit(images), rtol=0, atol=FP32_ATOL)


def test_bitfit_trains_exactly_the_biases_and_the_head(images):
    model = BitFit(tiny_vit(), num_classes=5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith("bias")}
    assert trainable == biases | {"head.weight", "head.bias"} == set(model.adapter_parameters())
    assert not any("norm" in n and n.endswith("weight") for n in trainable)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(images), torch.arange(6) % 5).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert not model.backbone.training, "the backbone stays in eval mode"


def test_bitfit_starts_as_the_linear_probe_and_round_trips(images, tmp_path):
    torch.manual_seed(0)
    linear = ViTClassifier(tiny_vit(), num_classes=5)
    torch.manual_seed(0)
    bitfit = BitFit(tiny_vit(), num_classes=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(bitfit(images), linear(images), rtol=0, atol=FP32_ATOL)
        for p in bitfit.adapter_parameters().values():
            p.add_(torch.randn_like(p))
    bitfit.save_pretrained(tmp_path)
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert type(reloaded) is BitFit
    with torch.no_grad():
        assert torch.equal(reloaded(images), bitfit(images))
    with pytest.raises(ValueError, match="holds a BitFit, not a PromptedViT"):
        sp.PromptedViT.from_pretrained(tmp_path, tiny_vit())


# METHODS.md section 10 (and SPT.md for VPT/SPT): trainable parameters on vit_base_patch16_224, 100 classes
VIT_BASE_COUNTS = {
    "linear": 76_900,
    "full": 85_875_556,
    "vpt-shallow": 100 * 768 + 76_900,
    "vpt-deep": 12 * 20 * 768 + 76_900,
    "spt-shallow": 100 * 768 + 76_900,
    "spt-deep": 12 * 20 * 768 + 76_900,
    "bitfit": 179_812,
    "gapt": 153_723,
    "lora": 371_812,
    "adaptformer": 233_668,
    "e2vpt": 215_140,
    "ssf": 282_724,
    "vfpt": 169_060,
    "cvpt": 169_060,
    "apt": 611_440,
    "bpt": 142_000,  # shallow: codes 100 x 75 + basis 768 x 75 + head (deep: 260,500 trained)
    "ipt": 178_276,
}


# pc's count is its kept prompts plus the head, known once condensed (tests/test_condensation.py)
COUNTED = [name for name in method_names() if name != "pc"]


def test_every_method_has_its_published_count():
    assert set(VIT_BASE_COUNTS) == set(COUNTED)


@pytest.fixture(scope="module")
def vit_base():
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


@pytest.mark.parametrize("method", COUNTED)
def test_trainable_parameters_of_vit_base_with_100_classes(method, vit_base):
    cfg = TrainConfig()
    cfg.model.method = method
    model = build_model(cfg, copy.deepcopy(vit_base), 100)
    assert model.num_adapter_parameters() == VIT_BASE_COUNTS[method]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == VIT_BASE_COUNTS[method]


# the first six: tests/test_reference.py; pc, which starts from a condensed run: tests/test_bench.py
@pytest.mark.parametrize("method", COUNTED[6:])
def test_package_recipe_trains_end_to_end_and_its_adapter_loads(method, tmp_path, images):
    """`selfprompt train` of the method's VTAB-mini recipe (zoo backbone), one epoch; the adapter loads."""
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    splits = [a for k, v in LIST_SPLITS.items() for a in (f"--data.{k}", v)]
    argv = ["train", str(RECIPES / f"{method.replace('-', '_')}.yaml"), "--data.root", str(data), *splits,
            "--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.num_workers", "0",
            "--optim.epochs", "1", "--stage", "final",
            "--output_dir", str(out), "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    backbone = timm.create_model("vit_mini_patch4_32.mae_fmnist", pretrained=True, num_classes=0)
    model = sp.load_pretrained(out / "seed0" / "final" / "adapter", backbone).eval()
    assert type(model) is get_method(method).model_class
    with torch.no_grad():
        assert model(images).shape == (len(images), 3)
