"""LoRA in peft's own format, both ways: `save_peft` / `selfprompt export --format peft` write a folder that
`peft.PeftModel.from_pretrained` loads onto a plain timm classifier with the same logits, and `load_peft`
reads a LoRA that peft trained on a timm ViT."""

import json

from selfprompt.cli import main
from selfprompt.methods.lora import LoRA, load_peft, peft_base, save_peft

import pytest
import torch
from conftest import TINY, tiny_vit
from engine_helpers import cli_args, make_dataset
from timm.models.vision_transformer import VisionTransformer

peft = pytest.importorskip("peft")
EXACT = 1e-5  # the bound; on one machine the logits come out equal


def trained_lora(pool: str) -> LoRA:
    model = LoRA(tiny_vit(), 5, rank=3, alpha=6.0, targets=["qkv", "mlp.fc1"], pool=pool).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("pool", ["token", "avg", "mae"])
def test_peft_loads_the_export_with_the_same_logits(pool, images, tmp_path):
    model = trained_lora(pool)
    save_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (3, 6.0)
    assert config["modules_to_save"] == ["head"]
    loaded = peft.PeftModel.from_pretrained(peft_base(tiny_vit(), 5, pool), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=EXACT)
    back = load_peft(tmp_path, tiny_vit(), pool=pool).eval()
    assert back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(images), model(images), rtol=0, atol=EXACT)


@pytest.mark.parametrize(
    ("pool", "timm_pooling"), [("token", {}), ("avg", {"global_pool": "avg", "fc_norm": False})]
)
def test_timm_create_model_with_the_documented_pooling_is_the_base(pool, timm_pooling, images, tmp_path):
    model = trained_lora(pool)
    save_peft(model, tmp_path)
    base = VisionTransformer(**TINY, num_classes=5, **timm_pooling)
    missing = base.load_state_dict(tiny_vit().state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["head.bias", "head.weight"]
    loaded = peft.PeftModel.from_pretrained(base.eval(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=EXACT)


def peft_trained(target_modules, tmp_path, **options):
    """A LoRA that peft itself puts on a timm ViT classifier (random A and B, as after training), saved."""
    timm_model = VisionTransformer(**TINY, num_classes=4)
    timm_model.load_state_dict(tiny_vit().state_dict(), strict=False)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=target_modules, modules_to_save=["head"], **options
    )
    peft_model = peft.get_peft_model(timm_model.eval(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(tmp_path))
    return peft_model.eval()


def test_a_lora_trained_with_peft_imports(images, tmp_path):
    peft_model = peft_trained(["qkv", "fc2"], tmp_path)
    model = load_peft(tmp_path, tiny_vit()).eval()
    assert (model.config.rank, model.config.alpha, model.config.targets) == (2, 4.0, ("qkv", "mlp.fc2"))
    assert model.config.num_classes == 4 and model.config.pool == "token"
    with torch.no_grad():
        torch.testing.assert_close(model(images), peft_model(images), rtol=0, atol=EXACT)


@pytest.mark.parametrize(
    ("targets", "options", "message"),
    [
        (["proj"], {}, "targets patch_embed.proj, which selfprompt's LoRA does not adapt"),
        (r"blocks\.0\.attn\.qkv", {}, "adapts the same layers in all 3 blocks"),
        (["qkv"], {"use_dora": True}, r"selfprompt's LoRA has no \['use_dora'\]"),
    ],
)
def test_what_selfprompt_cannot_express_is_refused(targets, options, message, tmp_path):
    peft_trained(targets, tmp_path, **options)
    with pytest.raises(ValueError, match=message):
        load_peft(tmp_path, tiny_vit())


def test_export_format_peft_from_a_run(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [*cli_args(data, out), "--model.method", "lora", "--prompt.num_prompts", "null", "--stage", "tune"]
    assert main(["train", *args, "--optim.epochs", "1", "--optim.warmup_epochs", "0"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    printed = capsys.readouterr().out
    assert "peft vs selfprompt, batch 3: max |diff|" in printed, printed
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert (
        main(["export", str(out), "--format", "peft", "--output", str(tmp_path / "x"), "--multitask", "true"])
        == 1
    )
