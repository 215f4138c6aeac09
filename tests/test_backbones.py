"""Backbones from weights files in every layout users bring: loaded bit-identical through the automatic
path, recorded with their licence, and refused with a clear error when they do not fit."""

import argparse
import json

from selfprompt.backbones import CheckpointError, backbone_info, create_backbone
from selfprompt.cli import main
from selfprompt.config import DataConfig, ModelConfig
from selfprompt.data.splits import preprocessing
from selfprompt.engine.build import head_input

import numpy
import pytest
import timm
import torch
from engine_helpers import TINY_BACKBONE, cli_args, make_dataset
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

NAME = "vit_tiny_patch16_224"  # its pretrained config: mean = std = 0.5, apache-2.0


def reference(seed: int = 7, **overrides) -> dict[str, torch.Tensor]:
    """A tiny ViT's weights, drawn with another seed than create_backbone's random init (0)."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, num_classes=0, **{**TINY_BACKBONE, **overrides})
    return {k: v.clone() for k, v in model.state_dict().items()}


def extra(*keys_shapes) -> dict[str, torch.Tensor]:
    return {k: torch.randn(*shape) for k, shape in keys_shapes}


# each layout as its official code saves it (see selfprompt.backbones.formats for the sources)
def mae_pretraining(sd):
    decoder = extra(("mask_token", (1, 1, 16)), ("decoder_embed.weight", (16, 32)),
                    ("decoder_pos_embed", (1, 65, 16)), ("decoder_blocks.0.norm1.weight", (16,)),
                    ("decoder_norm.weight", (16,)), ("decoder_pred.weight", (48, 16)))  # fmt: skip
    return {"model": {**sd, **decoder}, "epoch": 399, "args": argparse.Namespace(model="mae_vit_base")}


def mae_encoder_only(sd):  # the released mae_pretrain_vit_*.pth
    return {"model": dict(sd)}


def mae_finetuning(sd):
    return {"model": {**sd, **extra(("head.weight", (1000, 32)), ("head.bias", (1000,)))}, "epoch": 99}


def moco_v3_pretraining(sd):
    encoder = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    others = {f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()}
    heads = extra(("module.base_encoder.head.0.weight", (64, 32)), ("module.base_encoder.head.1.bias", (64,)),
                  ("module.predictor.0.weight", (64, 16)))  # fmt: skip
    return {"epoch": 300, "arch": "vit_base", "state_dict": {**encoder, **others, **heads}, "optimizer": {}}


def moco_v3_linear(sd):
    state = {f"module.{k}": v for k, v in sd.items()}
    state |= extra(("module.head.weight", (1000, 32)), ("module.head.bias", (1000,)))
    return {"epoch": 90, "arch": "vit_base", "state_dict": state, "best_acc1": torch.tensor(76.7)}


def dino_backbone(sd):
    return dict(sd)


def dino_full(sd):
    teacher = {f"backbone.{k}": v for k, v in sd.items()} | extra(("head.mlp.0.weight", (64, 32)))
    student = {f"module.backbone.{k}": v * 0 for k, v in sd.items()}
    return {"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="vit_base")}


def timm_pth(sd):
    return {**sd, **extra(("head.weight", (10, 32)), ("head.bias", (10,)))}


LAYOUTS = {
    "mae_pretraining": (mae_pretraining, "MAE pretraining", "mae", "cc-by-nc-4.0"),
    "mae_encoder_only": (mae_encoder_only, "MAE pretraining", "mae", "cc-by-nc-4.0"),
    "mae_finetuning": (mae_finetuning, "MAE fine-tuning", "mae", "cc-by-nc-4.0"),
    "moco_v3_pretraining": (moco_v3_pretraining, "MoCo v3 pretraining", "moco", "cc-by-nc-4.0"),
    "moco_v3_linear": (moco_v3_linear, "MoCo v3 linear probe", "moco", "cc-by-nc-4.0"),
    "dino_backbone": (dino_backbone, "timm state dict", None, "unknown"),
    "dino_full": (dino_full, "DINO full checkpoint (teacher)", "dino", "apache-2.0"),
    "timm_pth": (timm_pth, "timm state dict", None, "unknown"),
}
DROPPED = {
    "mae_pretraining": {"mask_token": 1, "decoder_embed": 1, "decoder_pos_embed": 1, "decoder_blocks": 1,
                        "decoder_norm": 1, "decoder_pred": 1},
    "mae_finetuning": {"head": 2},
    "moco_v3_pretraining": {"module.base_encoder.head": 2, "module.momentum_encoder": 30,
                            "module.predictor": 1},
    "moco_v3_linear": {"module.head": 2},
    "dino_full": {"teacher.head": 1, "student": 30},
    "timm_pth": {"head": 2},
}  # fmt: skip


def assert_identical(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_loads_bit_identical_through_the_automatic_path(layout, tmp_path):
    write, fmt, family, license = LAYOUTS[layout]
    overrides = {"global_pool": "avg"} if layout == "mae_finetuning" else {}
    sd = reference(**overrides)
    path = tmp_path / f"{layout}.pth"
    torch.save(write(sd), path)
    model = create_backbone(NAME, path, **TINY_BACKBONE)
    assert_identical(model, sd)
    assert not torch.equal(
        create_backbone(NAME, pretrained=False, **TINY_BACKBONE).cls_token, sd["cls_token"]
    )
    info = backbone_info(model)
    assert (info.format, info.family, info.license) == (fmt, family, license)
    assert info.load == {"loaded": len(sd), "missing": [], "unexpected": [], "resampled": None}
    assert info.dropped == DROPPED.get(layout, {})
    assert info.adapter_name == f"{NAME}+{layout}.pth"


def test_safetensors_and_a_named_dino_file(tmp_path):
    sd = reference()
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = create_backbone(NAME, tmp_path / "w.safetensors", **TINY_BACKBONE)
    assert_identical(model, sd)
    assert backbone_info(model).license == "unknown"  # an untagged name says nothing of the file's origin
    torch.save(sd, tmp_path / "dino_vitbase16_pretrain.pth")  # DINO's backbone files: plain timm keys
    dino = create_backbone(
        "vit_base_patch16_224.dino", tmp_path / "dino_vitbase16_pretrain.pth", **TINY_BACKBONE
    )
    assert_identical(dino, sd)
    info = backbone_info(dino)
    assert (info.family, info.license, info.pool) == ("dino", "apache-2.0", None)


def jax_npz(sd: dict[str, torch.Tensor], heads: int = 2) -> dict[str, numpy.ndarray]:
    """The original ViT JAX layout (google-research/vision_transformer) of a timm state dict: the inverse
    of timm's ``_load_weights`` for a plain ViT."""
    dim = sd["cls_token"].shape[-1]
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attention = p + "MultiHeadDotProductAttention_1/"
        qkv = zip(
            ("query", "key", "value"),
            sd[b + "attn.qkv.weight"].chunk(3),
            sd[b + "attn.qkv.bias"].chunk(3),
            strict=True,
        )
        for n, weight, bias in qkv:
            out[f"{attention}{n}/kernel"] = weight.T.reshape(dim, heads, -1)
            out[f"{attention}{n}/bias"] = bias.reshape(heads, -1)
        out[attention + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, -1).permute(1, 2, 0)
        out[attention + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    return {k: v.numpy() for k, v in out.items()}


def test_a_jax_npz_loads_through_timms_loader(tmp_path):
    sd = reference()
    numpy.savez(tmp_path / "ViT-Ti_16.npz", **jax_npz(sd))
    model = create_backbone("vit_tiny_patch16_224.augreg_in21k", tmp_path / "ViT-Ti_16.npz", **TINY_BACKBONE)
    assert_identical(model, sd)
    info = backbone_info(model)
    assert (info.format, info.license) == ("JAX .npz", "apache-2.0")
    numpy.savez(tmp_path / "deeper.npz", **jax_npz(reference(depth=3)))
    with pytest.raises(CheckpointError, match="has 3 encoder blocks"):
        create_backbone(NAME, tmp_path / "deeper.npz", **TINY_BACKBONE)
    with pytest.raises(CheckpointError, match=r"pass --model\.backbone"):
        create_backbone(None, tmp_path / "ViT-Ti_16.npz")


def test_architecture_inferred_from_the_checkpoint(tmp_path):
    torch.manual_seed(3)
    vit = timm.create_model(NAME, num_classes=0, depth=2)
    torch.save(moco_v3_pretraining(vit.state_dict()), tmp_path / "moco.pth.tar")
    model = create_backbone(None, tmp_path / "moco.pth.tar")
    assert backbone_info(model).name == NAME and len(model.blocks) == 2
    assert_identical(model, vit.state_dict())
    with pytest.raises(CheckpointError, match=r"Cannot infer the architecture.*--model.backbone vit_base"):
        create_backbone(None, _saved(tmp_path, reference()))  # width 32: no standard timm ViT


def test_the_backbone_command_reports_a_file_and_refuses_an_unknown_architecture(tmp_path, capsys):
    path = _saved(tmp_path, moco_v3_linear(reference()), "linear-vit-b-300ep.pth.tar")
    kwargs = json.dumps(TINY_BACKBONE)
    assert main(["backbone", "--backbone", NAME, "--checkpoint", str(path), "--backbone_kwargs", kwargs]) == 0
    first, _, rest = capsys.readouterr().out.partition("\n")
    assert "(MoCo v3 linear probe), family moco, licence cc-by-nc-4.0" in first
    report = json.loads(rest)
    assert report["dropped"] == {"module.head": 2} and report["load"]["missing"] == []
    assert report["preprocessing"]["mean"] == list(IMAGENET_DEFAULT_MEAN)
    data = make_dataset(tmp_path / "data")  # train with --model.backbone null: inferred, or a clear error
    argv = [
        "train",
        *cli_args(data, tmp_path / "run"),
        "--model.backbone",
        "null",
        "--model.checkpoint",
        str(path),
    ]
    assert main(argv) == 1
    assert "Cannot infer the architecture" in capsys.readouterr().err and not (tmp_path / "run").exists()


def _saved(tmp_path, obj, name="w.pth"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_position_embedding_of_another_grid_is_resampled_and_reported(tmp_path):
    sd = reference()  # 32 px, patch 4: an 8x8 grid
    model = create_backbone(NAME, _saved(tmp_path, sd), **{**TINY_BACKBONE, "img_size": 16})
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed, expected)
    assert backbone_info(model).load["resampled"] == "pos_embed (1, 65, 32) -> (1, 17, 32)"


def test_a_resnet_state_dict_is_refused(tmp_path):
    resnet = timm.create_model("resnet10t", num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match=r"not a Vision Transformer checkpoint.*ResNet"):
        create_backbone(NAME, _saved(tmp_path, resnet), **TINY_BACKBONE)


def test_a_vit_of_another_width_names_the_tensor_and_both_shapes(tmp_path):
    wide = reference(embed_dim=64, num_heads=2)
    with pytest.raises(CheckpointError, match=r"tensor cls_token has shape \(1, 1, 64\).*\(1, 1, 32\)"):
        create_backbone(NAME, _saved(tmp_path, wide), **TINY_BACKBONE)


def test_a_deeper_vit_is_not_loaded_partially(tmp_path):
    deep = reference(depth=3)
    with pytest.raises(CheckpointError, match=r"missing none, unexpected blocks\.2\..*depth 3"):
        create_backbone(NAME, _saved(tmp_path, deep), **TINY_BACKBONE)
    shallow = reference(depth=1)
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\."):
        create_backbone(NAME, _saved(tmp_path, shallow), **TINY_BACKBONE)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_refused(suffix, tmp_path):
    path = tmp_path / f"w{suffix}"
    sd = reference()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        create_backbone(NAME, path, **TINY_BACKBONE)


class Opaque:  # a class torch's weights-only unpickler does not allow
    pass


def test_pickled_objects_are_not_run(tmp_path):
    path = _saved(tmp_path, {"model": reference(), "extra": Opaque()})
    with pytest.raises(CheckpointError, match="weights_only=False"):
        create_backbone(NAME, path, **TINY_BACKBONE)


def test_preprocessing_and_head_input_follow_the_family(tmp_path):
    sd = reference()
    mae = create_backbone(NAME, _saved(tmp_path, mae_pretraining(sd), "mae.pth"), **TINY_BACKBONE)
    timm_file = create_backbone(NAME, _saved(tmp_path, sd, "plain.pth"), **TINY_BACKBONE)
    imagenet = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    pre = preprocessing(DataConfig(), mae)
    assert (pre["mean"], pre["std"]) == imagenet  # the untagged name's own config is 0.5/0.5
    assert preprocessing(DataConfig(), timm_file)["mean"] == (0.5, 0.5, 0.5)
    assert (lambda p: (p["mean"], p["std"]))(
        preprocessing(DataConfig(normalization="imagenet"), timm_file)
    ) == imagenet
    explicit = preprocessing(DataConfig(normalization="imagenet", mean=(0.1, 0.2, 0.3)), timm_file)
    assert explicit["mean"] == (0.1, 0.2, 0.3) and explicit["std"] == IMAGENET_DEFAULT_STD
    assert head_input(ModelConfig(), mae) == "mae" and head_input(ModelConfig(pool="avg"), mae) == "avg"
    assert head_input(ModelConfig(), timm_file) == "token"
    tagged = create_backbone("vit_mini_patch4_32.sup_fmnist")  # the zoo, offline by name
    assert backbone_info(tagged).license == "apache-2.0" and backbone_info(tagged).format == "timm"


def test_train_from_a_checkpoint_end_to_end_records_the_licence(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    path = _saved(tmp_path, mae_pretraining(reference()), "mae_pretrain_vit_tiny.pth")
    out = tmp_path / "run"
    args = ["train", *cli_args(data, out), "--model.checkpoint", str(path), "--optim.epochs", "1"]
    assert main([*args, "--stage", "tune"]) == 0
    printed = capsys.readouterr().out
    assert "licence cc-by-nc-4.0" in printed and "non-commercial use only" in printed
    summary = json.loads((out / "summary.json").read_text())["summary"]["backbone"]
    assert (summary["format"], summary["family"], summary["license"]) == (
        "MAE pretraining",
        "mae",
        "cc-by-nc-4.0",
    )
    assert summary["head_input"] == "mae" and summary["preprocessing"]["mean"] == list(IMAGENET_DEFAULT_MEAN)
    assert summary["load"]["missing"] == [] and summary["load"]["unexpected"] == []
    assert json.loads((out / "env.json").read_text())["backbone"] == summary
    adapter = json.loads((out / "seed0/tune/adapter/adapter_config.json").read_text())
    assert adapter["backbone_weights"] == {
        "license": "cc-by-nc-4.0", "family": "mae", "format": "MAE pretraining", "checkpoint": path.name,
        "hub_id": None, "kwargs": TINY_BACKBONE,  # a file's weights have no Hub repository
    }  # fmt: skip
    assert adapter["model"]["pool"] == "mae" and adapter["backbone"]["name"] == f"{NAME}+{path.name}"
    assert main(["eval", str(out), "--stage", "tune", "--split", "val"]) == 0  # rebuilt from the same file
    path.write_bytes(b"")  # a damaged file stops the next run with the clear error
    assert main([*args, "--output_dir", str(tmp_path / "run2")]) == 1
    assert "truncated, corrupt or not a checkpoint" in capsys.readouterr().err
