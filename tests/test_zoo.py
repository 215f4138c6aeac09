"""The offline zoo: shipped weights match their SHA-256, load by name through timm, and are documented."""

from __future__ import annotations

import shutil

import selfprompt
from selfprompt import zoo
from selfprompt.zoo.models import WEIGHTS_DIR, ZOO_TAGS

import pytest
import timm
import torch
from safetensors.torch import load_file


@pytest.mark.parametrize("name", ZOO_TAGS)
def test_shipped_weights_match_their_recorded_sha256(name):
    assert name in zoo.available()
    zoo.verify(name)
    entry = zoo.registry()[name]
    assert zoo.sha256(zoo.weights_file(name)) == entry["sha256"]
    card = zoo.weights_file(name).with_suffix(".md").read_text()
    for field in (
        entry["sha256"],
        "| command | `selfprompt pretrain",
        "| seed |",
        "| epochs |",
        "| wall time |",
    ):
        assert field in card, field


@pytest.mark.parametrize("name", ZOO_TAGS)
def test_zoo_backbones_load_offline_by_name(name):
    model = timm.create_model(name, pretrained=True)
    shipped = load_file(zoo.weights_file(name))
    state = model.state_dict()
    assert set(state) == set(shipped)
    for key, value in shipped.items():
        assert torch.equal(state[key], value.float()), key
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.patch_embed.img_size == (32, 32)
    # and through selfprompt, as any timm backbone
    prompted = selfprompt.PromptedViT(
        timm.create_model(name, pretrained=True, num_classes=0), 4, num_prompts=2
    )
    assert prompted(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_a_damaged_or_missing_zoo_file_is_refused(tmp_path):
    name = ZOO_TAGS[0]
    shutil.copytree(WEIGHTS_DIR, tmp_path / "weights")
    damaged = tmp_path / "weights" / f"{name}.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged or was replaced"):
        zoo.verify(name, tmp_path / "weights")
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match="zoo export"):
        zoo.verify(name, tmp_path / "weights")
    with pytest.raises(ValueError, match="not in selfprompt's zoo"):
        zoo.weights_file("vit_mini_patch4_32.nope")
