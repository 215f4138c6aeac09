"""The `selfprompt` command end to end, and its refusals of bad input (a clear message, nothing written)."""

import json
import shutil

from selfprompt.cli import main

import pytest
import torch
from engine_helpers import cli_args, make_dataset


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def test_train_from_recipe_with_overrides_then_eval_and_predict(data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  method: vpt-deep\n  num_prompts: 2\noptim:\n  lr: 0.5\n")
    out = tmp_path / "run"
    # the recipe comes first, the command line overrides it field by field
    assert main(["train", str(recipe), *cli_args(data, out)[:-4], "--model.method", "spt-shallow",
                 "--output_dir", str(out), "--progress", "false"]) == 0  # fmt: skip
    saved = (out / "config.yaml").read_text()
    assert "method: spt-shallow" in saved and "lr: 0.02" in saved and "num_prompts: 4" in saved
    final = json.loads((out / "seed0/final/result.json").read_text())
    capsys.readouterr()

    assert main(["eval", str(out), "--split", "test"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["images"] == 24 and scores["acc"] == final["last_test_acc"]

    test_images = data / "test"
    assert (
        main(["predict", str(out), str(test_images), "--output", str(tmp_path / "p.json"), "--topk", "2"])
        == 0
    )
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == 24 and {"path", "class_1", "probability_1", "class_2", "probability_2"} <= set(
        rows[0]
    )
    correct = sum(r["class_1"] == r["path"].split("/")[-2] for r in rows) / len(rows)
    assert correct == pytest.approx(final["last_test_acc"])
    assert (
        main(
            ["predict", str(out), str(test_images / "class0" / "0.png"), "--output", str(tmp_path / "p.csv")]
        )
        == 0
    )
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "path,class,probability"


def test_init_prompts_computes_caches_and_shows(data, tmp_path, capsys):
    args = ["init-prompts", *cli_args(data, tmp_path / "unused"), "--prompt.init", "kmeans"]
    output = tmp_path / "prompts.safetensors"
    assert main([*args, "--output", str(output)]) == 0
    assert "computed kmeans prompts (2, 4, 32)" in capsys.readouterr().out
    first = output.read_bytes()
    assert main([*args, "--output", str(output)]) == 0
    assert "reused cached" in capsys.readouterr().out and output.read_bytes() == first
    run_dir = tmp_path / "run"
    train = ["train", *cli_args(data, run_dir), "--prompt.file", str(output), "--stage", "tune"]
    assert main([*train, "--optim.epochs", "1"]) == 0


def test_help_lists_every_field_with_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for field in ("--optim.lr", "--model.method", "--data.root", "--unsafe_select_on_test", "--seeds"):
        assert field in text
    assert "Peak learning rate" in text and "default: 0.001" in text


@pytest.mark.parametrize("where", ["command line", "recipe"])
def test_unknown_field_suggests_the_closest_name(where, tmp_path, capsys):
    argv = ["train", "--optim.lrr", "0.1"]
    if where == "recipe":
        (tmp_path / "r.yaml").write_text("optim:\n  lrr: 0.1\n")
        argv = ["train", str(tmp_path / "r.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    where = f" in {tmp_path / 'r.yaml'}" if where == "recipe" else ""
    assert f"unknown config field 'optim.lrr'{where}; did you mean optim.lr?" in capsys.readouterr().err


def fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_missing_data_root(tmp_path, capsys):
    out = tmp_path / "run"
    err = fails(["train", *cli_args(tmp_path / "nowhere", out)], capsys)
    assert str(tmp_path / "nowhere") in err
    assert not out.exists()


def test_class_folder_without_images(data, tmp_path, capsys):
    for image in (data / "train" / "class1").iterdir():
        image.unlink()
    out = tmp_path / "run"
    err = fails(["train", *cli_args(data, out), "--data.layout", "folder"], capsys)
    assert str(data / "train" / "class1") in err and not out.exists()


def test_label_outside_the_class_range(data, tmp_path, capsys):
    lines = (data / "val.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    (data / "val.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    err = fails(["train", *cli_args(data, out)], capsys)
    assert "val.txt:3" in err and "7" in err and not out.exists()


def test_unreadable_image_is_named(data, tmp_path, capsys):
    broken = data / "test" / "class2" / "3.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "run"
    assert str(broken) in fails(["train", *cli_args(data, out)], capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_where_there_is_none(data, tmp_path, capsys):
    out = tmp_path / "run"
    err = fails(["train", *cli_args(data, out), "--device", "cuda"], capsys)
    assert "CUDA is not available" in err and "--device cpu" in err and not out.exists()


def test_resume_refuses_a_changed_config_and_a_run_is_never_overwritten(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *cli_args(data, out), "--optim.epochs", "1", "--stage", "tune"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "already holds a run" in fails(args, capsys)
    err = fails([*args, "--resume", "true", "--optim.lr", "0.5", "--prompt.num_prompts", "3"], capsys)
    assert "config changed in optim.lr, prompt.num_prompts" in err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*args, "--resume", "true"]) == 0  # unchanged: the finished stage is not recomputed
    shutil.rmtree(out)
    assert "Nothing to resume" in fails([*args, "--resume", "true"], capsys)


def test_unknown_backbone_and_missing_weights(data, tmp_path, capsys):
    out = tmp_path / "run"
    err = fails(["train", *cli_args(data, out), "--model.backbone", "vit_tiny_patch16_2244"], capsys)
    assert "Unknown backbone 'vit_tiny_patch16_2244'" in err and "'vit_tiny_patch16_224'" in err
    err = fails(["train", *cli_args(data, out), "--model.pretrained", "true"], capsys)  # offline: no hub
    assert "--model.checkpoint" in err and not out.exists()


def test_tensorboard_without_its_package(data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    out = tmp_path / "run"
    assert "pip install 'selfprompt[tensorboard]'" in fails(
        ["train", *cli_args(data, out), "--tensorboard", "true"], capsys
    )
    assert not out.exists()


def test_version_names_the_package_torch_and_timm(capsys):
    import selfprompt

    import timm

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(
        f"selfprompt {selfprompt.__version__} (torch {torch.__version__}, timm {timm.__version__}"
    )


def test_a_log_gets_one_plain_line_per_epoch_and_no_progress_updates(data, tmp_path, capsys):
    """stdout and stderr are not terminals here (pytest captures them), as in a log file."""
    args = [*cli_args(data, tmp_path / "run"), "--progress", "true", "--stage", "tune"]
    assert main(["train", *args, "--optim.epochs", "2", "--optim.warmup_epochs", "0"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    epoch_lines = [line for line in captured.out.splitlines() if "] epoch " in line]
    assert [line.split("] epoch ")[1][:3] for line in epoch_lines] == ["1/2", "2/2"], captured.out
