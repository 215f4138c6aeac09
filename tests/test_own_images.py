"""One's own image folder: splits found, a validation split carved, the recipe without a file, split errors
that name their option, `data check`, `data show`, and the README section's commands as written."""

import re
import shlex
from collections import Counter
from pathlib import Path

from selfprompt.apps.own_images import own_recipe
from selfprompt.apps.show_data import grid_size
from selfprompt.cli import main
from selfprompt.cli.train import own_images
from selfprompt.config import ConfigError, TrainConfig, check_config
from selfprompt.data import write_image_folder
from selfprompt.data.config import DataConfig
from selfprompt.data.own_folder import find_splits
from selfprompt.data.splits import build_splits
from selfprompt.engine.build import method_settings
from selfprompt.methods import method_names

import pytest
import timm
from PIL import Image

README = Path(__file__).parents[1] / "README.md"
FAST = ["--optim.epochs", "1", "--optim.warmup_epochs", "0", "--data.num_workers", "0", "--progress", "false"]


def folder(root: Path, splits=("train", "test"), per_class=12, classes=3) -> Path:
    counts = dict.fromkeys(splits, per_class)
    return write_image_folder(
        root, num_classes=classes, per_class=counts, splits=splits, size=16, lists=False
    )


def class_folders(root: Path) -> Path:
    """Class folders with images, without a train/ folder around them."""
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "0.png")
    return root


@pytest.fixture(scope="module")
def backbone():
    return timm.create_model("vit_mini_patch4_32", pretrained=False, num_classes=0)


def test_splits_are_found(tmp_path):
    only = find_splits(folder(tmp_path / "a", ("train",)))
    assert (only.train, only.val, only.test) == ("train", None, None)
    named = find_splits(folder(tmp_path / "b", ("train", "validation", "test")))
    assert (named.val, named.test) == ("validation", "test")
    assert named.data_settings() == {
        "layout": "folder", "train_split": "train", "val_split": "validation", "trainval_split": None,
        "test_split": "test",
    }  # fmt: skip
    both = folder(tmp_path / "c", ("train", "val", "validation"))
    with pytest.raises(ValueError, match=r"--data.val_split val or --data.val_split validation"):
        find_splits(both)


def test_a_folder_without_train_says_how_to_lay_it_out(tmp_path):
    flat = folder(tmp_path / "flat", ("cats", "dogs"))  # images in cats/class0/..: not class folders
    with pytest.raises(FileNotFoundError, match=r"--data.train_split NAME"):
        find_splits(flat)
    classes = class_folders(tmp_path / "classes")
    with pytest.raises(FileNotFoundError, match=r"move them into .*classes/train/"):
        find_splits(classes)


def test_train_on_a_folder_of_class_folders_says_how_to_lay_it_out(tmp_path, capsys):
    classes = class_folders(tmp_path / "classes")
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--data.root", str(classes)])
    assert stopped.value.code == 2 and not (tmp_path / "runs").exists()
    assert f"move them into {classes}/train/" in capsys.readouterr().err


def test_carve_is_seeded_and_stratified_and_said_in_one_line(tmp_path, backbone):
    root = folder(tmp_path / "d", ("train",), per_class=20, classes=4)
    cfg = DataConfig(root=str(root), layout="folder", train_split="train", val_split=None, test_split=None)
    lines = []
    splits = build_splits(cfg, backbone, seed=3, log=lines.append)
    again = build_splits(cfg, backbone, seed=3)
    other = build_splits(cfg, backbone, seed=4)
    assert splits.val.samples == again.val.samples != other.val.samples
    assert Counter(label for _, label in splits.val.samples) == dict.fromkeys(range(4), 2)  # 10% of 20 each
    assert not {p for p, _ in splits.val.samples} & {p for p, _ in splits.train.samples}
    assert len(splits.trainval) == 80 and splits.test is None
    assert len(lines) == 1 and "carved 8 of the 80 images" in lines[0] and "--data.val_fraction" in lines[0]
    assert set(splits.fingerprints()) == {"train", "val", "trainval"}


@pytest.mark.parametrize(
    ("layout", "field", "option"),
    [
        ("folder", "train_split", "--data.train_split NAME"),
        ("folder", "val_split", "--data.val_split null"),
        ("folder", "test_split", "--data.test_split null with --stage tune"),
        ("list", "trainval_split", "--data.trainval_split null"),
    ],
)
def test_each_split_error_names_its_option(tmp_path, backbone, layout, field, option):
    root = write_image_folder(tmp_path / "e", num_classes=2, per_class=4, size=16)  # folders and lists
    trainval = "trainval" if layout == "list" else None  # folders: train + val merged
    splits = {"train_split": "train", "val_split": "val", "trainval_split": trainval, "test_split": "test"}
    cfg = DataConfig(root=str(root), layout=layout, **{**splits, field: "missing"})
    with pytest.raises(FileNotFoundError, match=re.escape(option)):
        build_splits(cfg, backbone)


def test_list_layout_on_split_folders_names_the_layout_option(tmp_path, backbone):
    root = folder(tmp_path / "f", ("train", "val", "test"))
    with pytest.raises(FileNotFoundError, match=r"--data.layout folder.*--data.train_split NAME"):
        build_splits(DataConfig(root=str(root), train_split="train", val_split="val"), backbone)


def test_a_final_stage_without_a_test_split_names_the_options():
    cfg = TrainConfig(data=DataConfig(test_split=None))
    with pytest.raises(ConfigError, match=r"--data.test_split NAME, or --stage tune"):
        check_config(cfg)
    cfg.stage = "tune"
    check_config(cfg)


def test_the_recipe_without_a_file(tmp_path):
    root = folder(tmp_path / "g", ("train",))
    recipe, splits = own_recipe(root, "spt-deep")
    cfg = TrainConfig.from_dict(recipe)
    assert (cfg.data.layout, cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == (
        "folder", "train", None, None
    )  # fmt: skip
    assert cfg.stage == "tune" and cfg.output_dir == "runs/g-spt-deep" and "val none" in splits
    assert cfg.model.backbone == "vit_mini_patch4_32.sup_fmnist" and cfg.data.batch_size == 32
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.lr) == (10, 1, 5e-2)  # VTAB-mini's spt-deep
    check_config(cfg)
    assert own_recipe(folder(tmp_path / "h"), "linear")[0]["stage"] == "both"
    # a layout or a task on the command line, or a folder without train/, keeps the command's old defaults
    assert own_images({"--data.root": str(root), "--data.layout": "folder"}) is None
    assert own_images({"--data.root": str(root), "--data.task": "cub"}) is None
    assert own_images({"--data.root": str(tmp_path / "nowhere")}) is None


@pytest.mark.parametrize("method", method_names())
def test_every_method_has_a_recipe_for_ones_own_folder(tmp_path, method):
    cfg = TrainConfig.from_dict(own_recipe(folder(tmp_path / "i"), method)[0])
    check_config(cfg)
    method_settings(cfg)  # every value is one the method reads
    assert cfg.model.method == method and cfg.data.layout == "folder"


def test_train_and_predict_without_a_recipe(tmp_path, monkeypatch, capsys):
    root = folder(tmp_path / "mine")  # train/ and test/: val is carved, stage both
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model.method", "vpt-deep", "--data.root", str(root), *FAST]) == 0
    printed = capsys.readouterr()
    assert "one's own images, train train/, val none" in printed.err and "stage both" in printed.err
    assert "--model.backbone vit_base_patch16_224" in printed.err  # the hint for photos
    assert len([line for line in printed.out.splitlines() if "validation split: carved" in line]) == 1
    run = tmp_path / "runs" / "mine-vpt-deep"
    assert (run / "seed0" / "final" / "adapter" / "adapter.safetensors").is_file()
    assert "layout: folder" in (run / "config.yaml").read_text()
    assert main(["predict", str(run), str(root / "test"), "--output", "p.csv"]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 36


def test_data_check_on_ones_own_folder(tmp_path, capsys):
    root = folder(tmp_path / "mine", ("train", "val"))
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: train/: 36 images, 3 classes (12 per class)" in out and "test: none" in out
    assert out.rstrip().endswith("ok")
    (root / "val" / "class1" / "copy.png").write_bytes((root / "train" / "class1" / "0.png").read_bytes())
    assert main(["data", "check", str(root)]) == 1
    assert "same image as" in capsys.readouterr().out


def test_data_show_writes_a_grid(tmp_path, capsys):
    root = folder(tmp_path / "mine", ("train",), per_class=5, classes=3)
    output = tmp_path / "grid.png"
    assert main(["data", "show", str(root), "--output", str(output), "--per_class", "2"]) == 0
    assert "3 classes x 2 images at 96x96" in capsys.readouterr().out
    with Image.open(output) as image:
        assert image.size == grid_size(3, 2, 96)  # 32x32 eval inputs enlarged to 96


def _readme_block() -> list[str]:
    section = README.read_text().split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every `selfprompt` line of README's "Your own images", as written (its first line installs the package
    this test runs in), in a folder holding my_images/ (3 classes, 24 train and 4 test images each)."""
    lines = _readme_block()
    assert lines[0].startswith("python3 -m venv .venv")
    assert all(line.startswith("selfprompt ") for line in lines[1:])
    write_image_folder(
        tmp_path / "my_images", num_classes=3, per_class={"train": 24, "test": 4}, splits=("train", "test"),
        size=32, lists=False,
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for line in lines[1:]:
        assert main(shlex.split(line)[1:]) == 0, line
    assert (tmp_path / "my_images_images.png").is_file()
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,class") and len(rows) == 1 + 12
