"""One settings dataclass per method: the recipe section, the model's arguments and (with ClassifierConfig's
fields) what its adapter stores; every range rule refused by the CLI before the run folder exists."""

import dataclasses
import json
from pathlib import Path

import selfprompt as sp
from selfprompt.cli import main
from selfprompt.methods import settings_sections
from selfprompt.methods.adaptformer import AdaptFormer, AdaptFormerConfig, AdaptFormerSettings
from selfprompt.methods.gapt import GaPT, GaPTSettings
from selfprompt.methods.lora import LoRA, LoRAConfig, LoRASettings
from selfprompt.methods.prompt import PromptedViT
from selfprompt.methods.vfpt import VFPT, VFPTSettings

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import cli_args, make_dataset

SHORT = ["--stage", "final", "--optim.epochs", "1", "--optim.warmup_epochs", "0"]
NO_PROMPTS = ["--prompt.num_prompts", "null"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


# method, extra arguments, what the one-line message says
BAD = [
    ("lora", ["--lora.rank", "0"], "lora.rank must be an integer >= 1, got 0"),
    ("lora", ["--lora.alpha", "0"], "lora.alpha must be a number > 0, got 0.0"),
    ("lora", ["--lora.alpha", "nan"], "lora.alpha must be a finite number, got nan"),
    ("lora", ["--lora.dropout", "1"], "lora.dropout must be in [0, 1), got 1.0"),
    ("lora", ["--lora.targets", "[proj]"], "lora.targets: a bare 'proj' also matches"),
    ("lora", ["--lora.targets", "[head]"], "lora.targets: unknown target 'head'"),
    ("lora", ["--lora.targets", "[]"], "lora.targets is empty"),
    ("adaptformer", ["--adaptformer.bottleneck", "0"], "adaptformer.bottleneck must be an integer >= 1"),
    ("adaptformer", ["--adaptformer.dropout", "-0.5"], "adaptformer.dropout must be in [0, 1), got -0.5"),
    ("adaptformer", ["--adaptformer.scale", "inf"], "adaptformer.scale must be a finite number, got inf"),
    ("e2vpt", ["--e2vpt.kv_length", "-1"], "e2vpt.kv_length must be an integer >= 0"),
    ("e2vpt", ["--e2vpt.prune_tokens", "1.0"], "e2vpt.prune_tokens must be the share pruned, in [0, 1)"),
    ("e2vpt", ["--e2vpt.prune_segments", "0.5"], "prune_tokens and prune_segments need pruning"),
    ("e2vpt", ["--e2vpt.pruning", "missing.json"], "e2vpt.pruning must be a file written by selfprompt"),
    ("gapt", ["--gapt.gate_init", "nan"], "gapt.gate_init must be a finite number, got nan"),
    ("gapt", ["--prompt.deep_layers", "1"], "gapt has one shallow prompt set; drop prompt.deep_layers"),
    ("vfpt", ["--vfpt.fourier_share", "1.5"], "vfpt.fourier_share must be in [0, 1], got 1.5"),
    ("vfpt", ["--vfpt.fourier_share", "-0.1"], "vfpt.fourier_share must be in [0, 1], got -0.1"),
    ("vfpt", ["--prompt.init", "sample", "--vfpt.fourier_share", "1"], "every prompt is a Fourier prompt"),
    ("cvpt", ["--prompt.num_prompts", "0"], "prompt.num_prompts must be an integer in 1..1024"),
    ("cvpt", ["--track.every", "1"], "cvpt (whose prompts are not in the sequence)"),
    ("vpt-shallow", ["--prompt.deep_layers", "1"], "vpt-shallow has one prompt set, before block 0"),
    ("spt-deep", ["--prompt.num_prompts", "0"], "prompt.num_prompts must be an integer in 1..1024"),
    ("spt-deep", ["--prompt.deep_layers", "0"], "prompt.deep_layers must be an integer >= 1 or null"),
    ("spt-deep", ["--prompt.deep_layers", "99"], "prompt.deep_layers must be in [1, 2] (the backbone's"),
    ("spt-deep", ["--prompt.dropout", "1"], "prompt.dropout must be in [0, 1), got 1.0"),
    ("spt-deep", ["--prompt.init_fraction", "0"], "prompt.init_fraction must be in (0, 1]"),
    ("spt-deep", ["--prompt.init_max_images", "0"], "prompt.init_max_images must be >= 1 or null"),
    ("pc", ["--condense.adapter", "missing"], "condense.adapter must be a folder written by selfprompt"),
    ("ssf", ["--ssf.final_placement", "before_norm"], "ssf.final_placement"),
    ("ssf", ["--lora.rank", "4"], "method 'ssf' does not read the lora settings; drop lora.rank"),
]


@pytest.mark.parametrize(("method", "extra", "message"), BAD, ids=[f"{m} {' '.join(e)}" for m, e, _ in BAD])
def test_the_cli_refuses_a_bad_setting_before_the_run_folder_exists(
    method, extra, message, data, tmp_path, capsys
):
    out = tmp_path / "run"
    prompts = [] if sp.get_method(method).has_prompts else NO_PROMPTS
    code = main(["train", *cli_args(data, out), *SHORT, "--model.method", method, *prompts, *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if message in line]) == 1, err
    assert not out.exists()


def test_every_settings_section_has_its_checks_on_its_dataclass():
    for section in settings_sections().values():
        assert dataclasses.is_dataclass(section.cls)
        assert section.cls.__name__.endswith("Settings"), section.cls
    for name in ("lora", "adaptformer", "e2vpt", "vfpt", "prompt", "condense"):
        assert settings_sections()[name].cls().problems() == [], name


@pytest.mark.parametrize(
    ("model_class", "settings", "section"),
    [
        (LoRA, LoRASettings(rank=3, alpha=6.0, dropout=0.0, targets=["qkv", "mlp.fc1"]), "lora"),
        (AdaptFormer, AdaptFormerSettings(bottleneck=5, scale=0.3, dropout=0.2), "adaptformer"),
        (GaPT, GaPTSettings(gate_init=4.0), "gapt"),
        (VFPT, VFPTSettings(fourier_share=0.25), "vfpt"),
    ],
)
def test_the_settings_round_trip_through_adapter_config(model_class, settings, section, images, tmp_path):
    extra = {"num_prompts": 4} if section in ("gapt", "vfpt") else {}
    by_object = model_class(tiny_vit(), 5, settings=settings, **extra).eval()
    by_name = model_class(tiny_vit(), 5, **dataclasses.asdict(settings), **extra)
    assert by_object.config == by_name.config
    assert isinstance(by_object.config, type(settings)) and by_object.config.num_classes == 5
    by_object.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["model"]
    for field in dataclasses.fields(settings):
        assert saved[field.name] == json.loads(json.dumps(getattr(settings, field.name))), field.name
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert type(reloaded) is model_class and reloaded.config == by_object.config
    with torch.no_grad():
        assert torch.equal(reloaded(images), by_object(images))


def test_a_bad_value_given_to_a_constructor_names_the_section_field():
    with pytest.raises(ValueError, match=r"lora\.rank must be an integer >= 1, got 0; lora\.alpha must be"):
        LoRA(tiny_vit(), 5, rank=0, alpha=-1.0)
    with pytest.raises(ValueError, match=r"adaptformer\.bottleneck must be an integer >= 1, got 0"):
        AdaptFormer(tiny_vit(), 5, settings=AdaptFormerSettings(bottleneck=0))
    with pytest.raises(ValueError, match=r"vfpt\.fourier_share must be in \[0, 1\], got 2"):
        VFPT(tiny_vit(), 5, num_prompts=4, fourier_share=2)
    with pytest.raises(TypeError, match=r"unknown arguments \['rnak'\]"):
        LoRA(tiny_vit(), 5, rnak=4)


# adapter_config.json's "model" as the release before one settings class per method wrote it
OLD_MODEL_FIELDS = {
    LoRA: {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv"]},
    AdaptFormer: {"bottleneck": 6, "scale": 0.1, "dropout": 0.0},
    GaPT: {"num_prompts": 3, "deep": False, "deep_layers": None, "prompt_dropout": 0.1, "gate_init": 4.0},
    VFPT: {"num_prompts": 4, "deep": True, "deep_layers": None, "prompt_dropout": 0.1, "fourier_share": 0.75},
}


@pytest.mark.parametrize("model_class", list(OLD_MODEL_FIELDS), ids=lambda c: c.__name__)
def test_an_adapter_of_the_earlier_release_still_loads(model_class, images, tmp_path):
    common = {"num_classes": 5, "pool": "token", "head_init_std": 0.02, "train_backbone": False}
    old = {**common, **OLD_MODEL_FIELDS[model_class]}
    renamed = model_class.config_class.renamed_fields  # prompt_dropout -> dropout (PromptSettings.dropout)
    now = {renamed.get(name, name): value for name, value in old.items()}
    model = model_class(tiny_vit(), backbone_name=None, **now).eval()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    record = json.loads(config_file.read_text())
    assert record["class"] == model_class.__name__
    assert record["model"] == now, "the saved fields are the earlier release's, renamed ones renamed"
    record["model"] = old
    config_file.write_text(json.dumps(record))
    reloaded = sp.load_pretrained(tmp_path, tiny_vit()).eval()
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_the_deprecated_prompt_dropout_keyword_still_works():
    with pytest.warns(FutureWarning, match="now dropout"):
        model = PromptedViT(tiny_vit(), 5, num_prompts=2, prompt_dropout=0.25)
    assert model.config.dropout == 0.25 and model.prompt_dropout.p == 0.25
    with pytest.warns(FutureWarning, match="is now num_prompts=3"):
        model = PromptedViT(tiny_vit(), 5, 3, deep=True)
    assert model.num_prompts == 3 and model.config.deep


def test_old_names_still_import():
    assert LoRAConfig.__name__ == "LoRAConfig" and issubclass(LoRAConfig, LoRASettings)
    assert issubclass(AdaptFormerConfig, sp.ClassifierConfig)
