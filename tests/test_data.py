import shutil
from pathlib import Path

import selfprompt as sp
from selfprompt.data import (
    ImageDataset,
    build_transform,
    data_config,
    load_split,
    merge,
    split_off,
    write_image_folder,
)

import pytest
import timm
import torch
from conftest import tiny_vit
from PIL import Image

COUNTS = {"train": 6, "val": 3, "test": 4}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A read-only generated dataset shared by the tests that do not modify it."""
    return write_image_folder(tmp_path_factory.mktemp("gen") / "data", num_classes=3, per_class=COUNTS)


@pytest.fixture
def data(generated, tmp_path) -> Path:
    """A private copy for tests that modify the dataset."""
    return Path(shutil.copytree(generated, tmp_path / "data"))


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns) for p in root.rglob("*"))


def fails_cleanly(root: Path, error: type[Exception], call, *fragments: str) -> str:
    """The call raises ``error`` whose message holds every fragment, and nothing changed under root."""
    before = tree(root.parent)
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert tree(root.parent) == before
    return message


def test_folder_and_list_layouts_load_the_same_samples(generated):
    for split, count in COUNTS.items():
        folder = load_split(generated, "folder", split)
        listed = load_split(generated, "list", split)
        assert folder.samples == listed.samples
        assert folder.classes == listed.classes == ["class0", "class1", "class2"]
        assert len(folder) == 3 * count and folder.num_classes == 3
        assert all(path.is_absolute() for path, _ in folder.samples)
        assert all(path.parent.name == f"class{label}" for path, label in folder.samples)
        assert folder.fingerprint() == listed.fingerprint()
    trainval = load_split(generated, "list", "trainval")
    union = merge(load_split(generated, "folder", "train"), load_split(generated, "folder", "val"))
    assert union.samples == trainval.samples


def test_items_are_rgb_images_or_transformed(generated):
    dataset = load_split(generated, "folder", "val")
    image, label = dataset[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == dataset.samples[4][1] == 1
    dataset.transform = build_transform(data_config(tiny_vit()), train=False)
    tensor, _ = dataset[4]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32


def test_eval_splits_follow_the_train_classes(data):
    shutil.rmtree(data / "val" / "class0")
    train = load_split(data, "folder", "train")
    val = load_split(data, "folder", "val", classes=train.classes)
    assert val.classes == train.classes
    assert sorted({label for _, label in val.samples}) == [1, 2]
    assert sorted({label for _, label in load_split(data, "folder", "val").samples}) == [0, 1]
    (data / "test" / "class1").rename(data / "test" / "zebra")
    fails_cleanly(
        data,
        ValueError,
        lambda: load_split(data, "folder", "test", classes=train.classes),
        str(data / "test" / "zebra"),
    )


def test_list_classes_come_from_classes_txt_or_labels(data):
    (data / "classes.txt").write_text("cat\ndog\n\nbird\n")
    assert load_split(data, "list", "val").classes == ["cat", "dog", "bird"]
    assert load_split(data, "list", "val", classes=["a", "b", "c", "d"]).num_classes == 4
    (data / "classes.txt").unlink()
    assert load_split(data, "list", "val").classes == ["0", "1", "2"]


def test_list_paths_may_contain_spaces(data):
    (data / "val" / "class1" / "0.png").rename(data / "val" / "class1" / "my image.png")
    (data / "spaced.txt").write_text("val/class1/my image.png\t1\n\n  val/class0/1.png   0  \n")
    dataset = load_split(data, "list", "spaced")
    assert dataset.samples == [(data / "val/class1/my image.png", 1), (data / "val/class0/1.png", 0)]


def test_fingerprint_is_stable_and_tracks_labels(data, tmp_path):
    first = load_split(data, "list", "train").fingerprint()
    assert load_split(data, "list", "train").fingerprint() == first
    moved = Path(shutil.copytree(data, tmp_path / "elsewhere"))
    assert load_split(moved, "list", "train").fingerprint() == first
    lines = (data / "train.txt").read_text().splitlines()
    lines[0] = lines[0][:-1] + "2"
    (data / "train.txt").write_text("\n".join(lines))
    assert load_split(data, "list", "train").fingerprint() != first


def test_missing_root_split_and_list_are_named(data):
    missing = data / "nope"
    fails_cleanly(data, FileNotFoundError, lambda: load_split(missing, "folder", "train"), str(missing))
    fails_cleanly(
        data,
        FileNotFoundError,
        lambda: load_split(data, "folder", "val200"),
        str(data / "val200"),
        "test, train, val",
    )
    fails_cleanly(
        data,
        FileNotFoundError,
        lambda: load_split(data, "list", "val200"),
        str(data / "val200.txt"),
        "test, train, trainval, val",
    )
    fails_cleanly(data, ValueError, lambda: load_split(data, "grid", "train"), "'grid'", str(data))


def test_empty_folders_are_named(data):
    for image in (data / "val" / "class2").iterdir():
        image.unlink()
    (data / "val" / "class2" / "notes.txt").write_text("not an image")
    fails_cleanly(data, ValueError, lambda: load_split(data, "folder", "val"), str(data / "val" / "class2"))
    (data / "empty").mkdir()
    fails_cleanly(data, ValueError, lambda: load_split(data, "folder", "empty"), str(data / "empty"), "empty")
    (data / "empty.txt").write_text("\n  \n")
    empty_list = str(data / "empty.txt")
    fails_cleanly(data, ValueError, lambda: load_split(data, "list", "empty"), empty_list, "empty")


@pytest.mark.parametrize(
    ("line", "error", "fragments"),
    [
        ("val/class0/0.png", ValueError, ["cannot parse", "'val/class0/0.png'"]),
        ("val/class0/0.png one", ValueError, ["cannot parse"]),
        ("train/class0/0.png 3", ValueError, ["label 3", "0..2"]),  # an image val.txt does not list yet
        ("train/class0/0.png -1", ValueError, ["label -1", "0..2"]),
        ("val/class0/missing.png 0", FileNotFoundError, [str(Path("val/class0/missing.png"))]),
    ],
)
def test_bad_list_lines_are_named_with_file_and_line(data, line, error, fragments):
    lines = (data / "val.txt").read_text().splitlines()
    lines.insert(2, line)
    (data / "val.txt").write_text("\n".join(lines))
    fails_cleanly(data, error, lambda: load_split(data, "list", "val"), f"{data / 'val.txt'}:3", *fragments)


def test_corrupt_image_is_caught_at_load_or_at_read(data):
    corrupt = data / "train" / "class1" / "2.png"
    corrupt.write_bytes(b"\x00not a png at all" * 10)
    fails_cleanly(data, ValueError, lambda: load_split(data, "folder", "train"), str(corrupt), "replace")
    fails_cleanly(data, ValueError, lambda: load_split(data, "list", "train"), str(corrupt), "replace")
    dataset = load_split(data, "folder", "train", check_images=False)
    index = [path for path, _ in dataset.samples].index(corrupt)
    dataset[index - 1]
    with pytest.raises(RuntimeError, match="remove or replace") as caught:
        dataset[index]
    assert str(corrupt) in str(caught.value)


def test_split_off_is_seeded_stratified_disjoint_and_complete(generated):
    dataset = load_split(generated, "folder", "train")
    dataset.samples.append((generated / "train" / "class0" / "0.png", 3))  # a class with a single sample
    dataset.classes.append("single")
    train, val = split_off(dataset, 0.34, seed=0)
    again_train, again_val = split_off(dataset, 0.34, seed=0)
    assert train.samples == again_train.samples and val.samples == again_val.samples
    assert {p for p, _ in split_off(dataset, 0.34, seed=1)[1].samples} != {p for p, _ in val.samples}
    assert not set(train.samples) & set(val.samples)
    assert sorted(train.samples + val.samples) == sorted(dataset.samples)
    per_class = [sum(label == k for _, label in val.samples) for k in range(4)]
    assert per_class == [2, 2, 2, 0]  # round(0.34 * 6) each; the single sample stays in train
    assert train.classes == val.classes == dataset.classes and val.root == dataset.root
    few_val, many_val = split_off(dataset, 0.01, 0)[1], split_off(dataset, 0.99, 0)[1]
    assert [sum(label == k for _, label in few_val.samples) for k in range(4)] == [1, 1, 1, 0]
    assert [sum(label == k for _, label in many_val.samples) for k in range(4)] == [5, 5, 5, 0]
    with pytest.raises(ValueError, match="fraction"):
        split_off(dataset, 1.0, seed=0)


def test_merge_requires_the_same_dataset_and_disjoint_splits(generated, tmp_path):
    train = load_split(generated, "folder", "train")
    val = load_split(generated, "folder", "val", classes=train.classes)
    merged = merge(train, val)
    assert merged.samples == train.samples + val.samples and merged.classes == train.classes
    with pytest.raises(ValueError, match="share"):
        merge(train, train)
    with pytest.raises(ValueError, match="different classes"):
        merge(train, load_split(generated, "folder", "val", classes=[*train.classes, "extra"]))
    other = write_image_folder(tmp_path / "other", per_class=1, splits=("val",))
    with pytest.raises(ValueError, match="different datasets"):
        merge(train, load_split(other, "folder", "val"))


def test_data_config_follows_timm_and_applies_overrides():
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    cfg = data_config(backbone)
    assert cfg == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
    }
    cfg = data_config(backbone, img_size=64, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), interpolation="bilinear")
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (1, 2, 3)
    assert cfg["interpolation"] == "bilinear" and data_config(backbone, crop_pct=1.0)["crop_pct"] == 1.0
    assert data_config(tiny_vit())["input_size"] == (3, 32, 32)  # hand-built: its own image size
    resized = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96)
    assert data_config(resized)["input_size"] == (3, 96, 96)  # the size it was built for, not timm's default
    assert data_config(resized)["mean"] == (0.5, 0.5, 0.5)  # the rest still from its pretrained config
    with pytest.raises(ValueError, match="interpolation"):
        data_config(backbone, interpolation="cubic")


@pytest.mark.parametrize("train", [False, True])
def test_build_transform_shape_and_normalisation(train):
    cfg = data_config(tiny_vit(), img_size=24, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    out = build_transform(cfg, train=train, augment="crop-flip")(Image.new("RGB", (50, 40), (128, 128, 128)))
    assert out.shape == (3, 24, 24)
    expected = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 24, 24), atol=1e-3, rtol=0)


def test_train_crop_flip_is_random_and_eval_is_deterministic(generated):
    image = load_split(generated, "folder", "train")[0][0]
    cfg = data_config(tiny_vit())
    evaluate = build_transform(cfg, train=False)
    assert torch.equal(evaluate(image), evaluate(image))
    assert torch.equal(build_transform(cfg, train=True)(image), evaluate(image))  # VTAB: no augmentation
    augment = build_transform(cfg, train=True, augment="crop-flip")
    torch.manual_seed(0)
    first = augment(image)
    assert not torch.equal(first, augment(image))
    torch.manual_seed(0)
    assert torch.equal(first, augment(image))
    with pytest.raises(ValueError, match="augment"):
        build_transform(cfg, train=True, augment="autoaugment")


def test_write_image_folder_is_byte_deterministic(tmp_path):
    def contents(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    kwargs = dict(num_classes=2, per_class={"train": 3, "val": 2}, splits=("train", "val"), size=16)
    first = contents(write_image_folder(tmp_path / "a", seed=7, **kwargs))
    assert first == contents(write_image_folder(tmp_path / "b", seed=7, **kwargs))
    other = contents(write_image_folder(tmp_path / "c", seed=8, **kwargs))
    assert other.keys() == first.keys() and other["train/class0/0.png"] != first["train/class0/0.png"]
    assert first["trainval.txt"] == first["train.txt"] + first["val.txt"]
    assert first["val.txt"].decode().splitlines() == [
        "val/class0/0.png 0",
        "val/class0/1.png 0",
        "val/class1/0.png 1",
        "val/class1/1.png 1",
    ]
    no_lists = write_image_folder(tmp_path / "d", per_class=1, splits=("test",), lists=False)
    assert [p.name for p in no_lists.iterdir()] == ["test"]
    wide = write_image_folder(tmp_path / "e", num_classes=11, per_class=1, splits=("train",))
    assert load_split(wide, "folder", "train").samples == load_split(wide, "list", "train").samples


def test_generated_classes_are_learnable_by_a_tiny_vit_head(generated):
    cfg = data_config(tiny_vit())
    train = load_split(generated, "folder", "train", build_transform(cfg, train=False))
    test = load_split(generated, "folder", "test", build_transform(cfg, train=False), classes=train.classes)
    (x, y), (x_test, y_test) = (next(iter(torch.utils.data.DataLoader(d, len(d)))) for d in (train, test))
    torch.manual_seed(0)
    model = sp.PromptedViT(tiny_vit(), num_classes=train.num_classes, num_prompts=2)
    optimizer = torch.optim.AdamW(model.adapter_parameters().values(), lr=5e-2)
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() == 1.0


def test_image_dataset_from_samples(tmp_path):
    dataset = ImageDataset([(str(tmp_path / "a.png"), 1)], ["x", "y"], str(tmp_path))
    assert dataset.samples == [(tmp_path / "a.png", 1)] and dataset.root == tmp_path and len(dataset) == 1
    with pytest.raises(RuntimeError, match=r"a\.png"):
        dataset[0]
