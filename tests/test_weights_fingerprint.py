"""An adapter records its backbone's weights fingerprint and is refused on other weights (timm's
``pretrained=False`` keeps the pretrained name, so the signature alone passes); ``check_weights=False``
loads it on purpose; adapters of earlier releases, which record none, still load."""

import copy
import json
from pathlib import Path

import selfprompt as sp
from selfprompt.adapter import CONFIG_NAME, read_config, weights_fingerprint
from selfprompt.cli import main
from selfprompt.engine.run import run
from selfprompt.serving import MultiTaskViT, loading

import pytest
import timm
import torch
from conftest import tiny_vit
from engine_helpers import make_dataset, tiny_config

OLD_ADAPTERS = Path(__file__).parent / "fixtures" / "adapters_v1"
ZOO = "vit_mini_patch4_32.mae_fmnist"


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def test_the_fingerprint_is_of_the_weights_not_the_object_or_its_precision():
    backbone = tiny_vit(0)
    record = weights_fingerprint(backbone)
    assert len(record["tensors"]) == 3 and len(record["sha256"]) == 64
    twin = tiny_vit(7)
    twin.load_state_dict(backbone.state_dict())
    assert weights_fingerprint(twin) == record
    assert weights_fingerprint(copy.deepcopy(backbone).double()) == record  # float32 values kept exactly
    assert weights_fingerprint(tiny_vit(1))["sha256"] != record["sha256"]
    with torch.no_grad():
        dict(twin.named_parameters())[record["tensors"][1]][0, 0] += 1e-3
    assert weights_fingerprint(twin)["sha256"] != record["sha256"]


def test_an_adapter_on_other_weights_is_refused_and_loads_on_purpose(tmp_path, images):
    model = sp.PromptedViT(tiny_vit(0), num_classes=4, num_prompts=3, deep=True).eval()
    model.save_pretrained(tmp_path)
    assert _config(tmp_path)["backbone"]["fingerprint"] == weights_fingerprint(tiny_vit(0))
    with pytest.raises(ValueError, match="weights are not the ones the adapter") as error:
        sp.PromptedViT.from_pretrained(tmp_path, tiny_vit(1))
    assert "pretrained=False" in str(error.value) and "check_weights=False" in str(error.value)
    with pytest.raises(ValueError, match="check_weights=False"):
        sp.load_pretrained(tmp_path, tiny_vit(1))
    loaded = sp.load_pretrained(tmp_path, tiny_vit(0)).eval()  # the same weights, another object
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    other = sp.load_pretrained(tmp_path, tiny_vit(1), check_weights=False)
    torch.testing.assert_close(other.prompts, model.prompts)
    # re-saved on purpose, it belongs to the weights it now runs on
    other.save_pretrained(tmp_path / "again")
    assert _config(tmp_path / "again")["backbone"]["fingerprint"] == weights_fingerprint(tiny_vit(1))


def test_a_random_backbone_under_the_pretrained_name_is_refused(tmp_path):
    """The case found: the same timm name with ``pretrained=False`` passes the signature check."""
    pretrained = timm.create_model(ZOO, pretrained=True, num_classes=0)
    sp.ViTClassifier(pretrained, num_classes=3).save_pretrained(tmp_path)
    random = timm.create_model(ZOO, pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="pretrained=False"):
        sp.load_pretrained(tmp_path, random)
    sp.load_pretrained(tmp_path, timm.create_model(ZOO, pretrained=True, num_classes=0))


@pytest.mark.parametrize("kind", sorted(p.name for p in OLD_ADAPTERS.iterdir()))
def test_adapters_of_earlier_releases_have_no_fingerprint_and_load_on_any_weights(kind):
    folder = OLD_ADAPTERS / kind
    assert "fingerprint" not in _config(folder)["backbone"]
    sp.load_pretrained(folder, tiny_vit(0))
    sp.load_pretrained(folder, tiny_vit(1))


def test_full_fine_tuning_records_the_backbone_it_started_from(tmp_path, images):
    pristine = weights_fingerprint(tiny_vit(0))
    model = sp.ViTClassifier(tiny_vit(0), num_classes=4, train_backbone=True)
    with torch.no_grad():  # what training does: every backbone weight moves
        for param in model.backbone.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.eval().save_pretrained(tmp_path)
    assert _config(tmp_path)["backbone"]["fingerprint"] == pristine
    assert weights_fingerprint(model.backbone)["sha256"] != pristine["sha256"]
    with torch.no_grad():
        expected = model(images)
        # the adapter holds every backbone weight: whatever it is loaded onto computes the same
        for start in (tiny_vit(0), tiny_vit(1)):
            loaded = sp.load_pretrained(tmp_path, start).eval()
            torch.testing.assert_close(loaded(images), expected)
            assert loaded.backbone_fingerprint == pristine
    loaded.save_pretrained(tmp_path / "again")  # loaded onto other weights, it still names where it began
    assert _config(tmp_path / "again")["backbone"]["fingerprint"] == pristine


def test_bitfit_moves_only_biases_and_reloads_onto_the_backbone_it_trained(tmp_path):
    backbone = tiny_vit(0)
    model = sp.BitFit(backbone, num_classes=4)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            if name.startswith("backbone."):
                param.add_(0.01)
    model.save_pretrained(tmp_path)
    sp.load_pretrained(tmp_path, backbone)  # the biases moved in place; the fingerprinted weights did not


def test_a_damaged_fingerprint_record_is_named(tmp_path):
    sp.ViTClassifier(tiny_vit(0), num_classes=3).save_pretrained(tmp_path)
    config = _config(tmp_path)
    config["backbone"]["fingerprint"] = {"tensors": "pos_embed"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'backbone\.fingerprint'"):
        read_config(tmp_path)


def test_serving_refuses_other_weights_unless_told(tmp_path):
    sp.PromptedViT(tiny_vit(0), num_classes=4, num_prompts=3).save_pretrained(tmp_path)
    server = MultiTaskViT(tiny_vit(1))
    with pytest.raises(ValueError, match="check_weights=False"):
        server.add_adapter("task", tmp_path)
    server.add_adapter("task", tmp_path, check_weights=False)
    MultiTaskViT(tiny_vit(0)).add_adapter("task", tmp_path)


@pytest.mark.parametrize("command", ["eval", "predict", "serve", "export"])
def test_every_command_that_loads_adapters_has_the_opt_out(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--check_weights" in capsys.readouterr().out


def test_predict_and_eval_refuse_a_backbone_whose_weights_changed_unless_told(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    settings = {"stage": "final", "optim.epochs": 1, "optim.warmup_epochs": 0}
    run(tiny_config(data, out, method="linear", **settings), log=lambda _: None)
    create = loading.create_run_backbone

    def changed(cfg):  # what a weights file replaced since the run, or a hub tag updated, would give
        backbone = create(cfg)
        with torch.no_grad():
            for param in backbone.parameters():
                param.add_(0.1)
        return backbone

    monkeypatch.setattr(loading, "create_run_backbone", changed)
    images = str(data / "test" / "class0")
    for argv in (["predict", str(out), images], ["eval", str(out), "--split", "test"]):
        assert main([*argv, "--device", "cpu"]) == 1
        assert "--check_weights false" in capsys.readouterr().err
        assert main([*argv, "--device", "cpu", "--check_weights", "false"]) == 0
