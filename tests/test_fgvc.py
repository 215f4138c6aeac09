import dataclasses
import json
import shutil
import sys
import warnings
from pathlib import Path

from selfprompt.apps.bench import BenchConfig, bench
from selfprompt.cli import main
from selfprompt.config import DataConfig
from selfprompt.data import fgvc, load_split, registry, split_off, stratified_split, write_image_folder
from selfprompt.data.check import check_task
from selfprompt.data.splits import build_splits

import pytest
import yaml
from conftest import tiny_vit
from fgvc_fakes import make_fake, make_vpt_json, nabirds_leaf_ids, source_id

REPO = Path(__file__).resolve().parents[1]
SPLIT_FIELDS = ("train_split", "val_split", "trainval_split", "test_split")
NAMES = tuple(fgvc.DATASETS)
# (dataset, make_fake options): every official layout, both Dogs list places and both Cars layouts
LAYOUTS = [(n, {}) for n in NAMES] + [("dogs", {"dogs_lists": "lists"}), ("cars", {"cars_layout": "car_ims"})]
CLASS_NAMES = {
    "cub": ["001.Bird_1", "002.Bird_2", "003.Bird_3"],
    "nabirds": [f"Species {cid} (adult)" for cid in nabirds_leaf_ids(3)],
    "flowers": ["1", "2", "3"],
    "dogs": ["n02080000-Breed_0", "n02080001-Breed_1", "n02080002-Breed_2"],
    "cars": ["Make0 Model0 2000", "Make1 Model1 2001", "Make2 Model2 2002"],
}


def prepare(name: str, source: Path, **kwargs) -> Path:
    """fgvc.prepare on a 3-class fake, which must warn that the class count is not the real one."""
    with pytest.warns(UserWarning, match=f"has 3 classes, not {fgvc.DATASETS[name].num_classes}"):
        return fgvc.prepare(name, source, **kwargs)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_registry_sizes_are_consistent():
    assert set(NAMES) == {"cub", "nabirds", "flowers", "dogs", "cars"}
    for name, d in fgvc.DATASETS.items():
        assert d.name == name and d.homepage.startswith("http") and d.terms and d.folder
        assert d.vpt.test == d.official.test
        if d.official.val is None:  # VPT's train/val is a 90/10 split of official train
            assert d.vpt.train + d.vpt.val == d.official.train
            assert abs(d.vpt.val / d.official.train - 0.1) < 0.002
        else:
            assert d.vpt == d.official
    assert fgvc.DATASETS["cub"].official == fgvc.SplitSizes(5994, None, 5794)
    nabirds = fgvc.DATASETS["nabirds"].official
    assert nabirds.train + nabirds.test == 48562
    with pytest.raises(ValueError, match="Unknown FGVC dataset 'birds'; choose one of: cub, nabirds"):
        fgvc.get("birds")


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
def test_official_readers_give_contiguous_labels_and_existing_paths(name, options, tmp_path):
    source = make_fake(name, tmp_path, **options)
    read = fgvc.read_official(name, source)
    assert read.classes == CLASS_NAMES[name]
    expected = {"train": 1, "val": 1, "test": 3} if name == "flowers" else {"train": 3, "test": 2}
    assert {split: len(samples) for split, samples in read.splits.items()} == {
        split: 3 * n for split, n in expected.items()
    }
    for split, samples in read.splits.items():
        for label in range(3):  # every class, the right number of times
            assert sum(y == label for _, y in samples) == expected[split]
        for path, _ in samples:
            assert not Path(path).is_absolute() and (source / path).is_file()
    every = [p for samples in read.splits.values() for p, _ in samples]
    assert len(set(every)) == len(every)


def test_nabirds_maps_non_contiguous_leaf_ids_and_ignores_inner_nodes(tmp_path):
    source = make_fake("nabirds", tmp_path)
    assert len(lines(source / "classes.txt")) == 3 + 3  # inner hierarchy nodes + leaves
    read = fgvc.read_official("nabirds", source)
    for path, label in read.splits["train"]:
        assert path.split("/")[1] == f"{nabirds_leaf_ids(3)[label]:04d}"


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
def test_prepare_writes_lists_that_load_split_reads_back(name, options, tmp_path):
    source = make_fake(name, tmp_path, **options)
    out = prepare(name, source)
    assert out == source / fgvc.OUTPUT_DIR
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.txt" for s in fgvc.LIST_SPLITS] + ["classes.txt", fgvc.SPLIT_FILE]
    )
    loaded = {split: load_split(out, "list", split) for split in fgvc.LIST_SPLITS}
    official = fgvc.read_official(name, source)
    for dataset in loaded.values():
        assert dataset.classes == CLASS_NAMES[name]
        assert {label for _, label in dataset.samples} == {0, 1, 2}  # stratified: every class everywhere
    train, val, trainval, test = (
        {(p.resolve().relative_to(source).as_posix(), y) for p, y in loaded[s].samples}
        for s in fgvc.LIST_SPLITS
    )
    assert test == set(official.splits["test"])
    assert not train & val and trainval == train | val
    if name == "flowers":
        assert (train, val) == (set(official.splits["train"]), set(official.splits["val"]))
    else:
        assert trainval == set(official.splits["train"])
        assert len(val) == 3  # 10% of 3 per class, clamped to one
    record = json.loads((out / fgvc.SPLIT_FILE).read_text())
    seeded = name != "flowers"
    assert record == {
        "format_version": 1,
        "dataset": name,
        "splits": "official",
        "val": "seeded" if seeded else "official",
        "seed": 0 if seeded else None,
        "val_fraction": 0.1 if seeded else None,
        "num_classes": 3,
        "counts": {s: len(loaded[s]) for s in fgvc.LIST_SPLITS},
    }


def test_prepare_is_byte_deterministic_and_seeded(tmp_path):
    source = make_fake("cub", tmp_path, per_class=8)

    def written(seed: int) -> dict[str, bytes]:
        out = prepare("cub", source, seed=seed, val_fraction=0.25)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = written(0)
    assert written(0) == first
    other = written(1)
    assert other["val.txt"] != first["val.txt"] and other["trainval.txt"] == first["trainval.txt"]
    assert other["test.txt"] == first["test.txt"] and other["classes.txt"] == first["classes.txt"]
    val = load_split(source / fgvc.OUTPUT_DIR, "list", "val")
    assert len(val) == 3 * 2  # round(0.25 * 6) per class


def test_prepare_can_write_outside_the_source(tmp_path):
    source = make_fake("cars", tmp_path / "readonly")
    before = tree(source)
    out = prepare("cars", source, out=tmp_path / "lists" / "cars")
    assert tree(source) == before
    assert lines(out / "test.txt")[0] == "../../readonly/Stanford-cars/cars_test/00001.jpg 0"
    test = load_split(out, "list", "test")
    assert len(test) == 6 and all(path.is_file() for path, _ in test.samples)

    source = make_fake("cub", tmp_path)
    before = tree(source)
    with pytest.raises(FileExistsError, match=r"already holds classes.txt, not written by prepare"):
        fgvc.prepare("cub", source, out=source)  # would clobber CUB's own classes.txt
    assert tree(source) == before


def test_stratified_split_is_what_split_off_does(tmp_path):
    data = write_image_folder(tmp_path / "data", num_classes=3, per_class=7, splits=("train",), size=8)
    dataset = load_split(data, "folder", "train")
    train, val = split_off(dataset, 0.3, seed=4)
    assert stratified_split(dataset.samples, 0.3, seed=4) == (train.samples, val.samples)
    plain = [(path.name, label) for path, label in dataset.samples]  # any item type
    assert stratified_split(plain, 0.3, 4)[1] == [(path.name, label) for path, label in val.samples]
    assert [sum(y == c for _, y in val.samples) for c in range(3)] == [2, 2, 2]  # round(0.3 * 7) each


@pytest.mark.parametrize(
    ("name", "options"), [(n, {}) for n in NAMES if n != "cars"] + [("cars", {"cars_layout": "car_ims"})]
)
def test_vpt_json_splits_are_read_and_named_from_the_archive(name, options, tmp_path):
    source = make_fake(name, tmp_path, **options)
    official = fgvc.read_official(name, source).splits
    json_dir = make_vpt_json(name, source, official, out=tmp_path / "vpt_splits")
    table = json.loads((json_dir / "train.json").read_text())
    assert all((source / fgvc.DATASETS[name].vpt_image_dir / key).is_file() for key in table)

    read = fgvc.read_vpt_json(name, source, json_dir)
    assert read.classes == CLASS_NAMES[name]
    out = prepare(name, source, splits="vpt", json_dir=json_dir)
    record = json.loads((out / fgvc.SPLIT_FILE).read_text())
    assert (record["splits"], record["val"], record["seed"]) == ("vpt", "vpt", None)
    for split in ("train", "val", "test"):
        listed = load_split(out, "list", split)
        assert len(listed) == len(json.loads((json_dir / f"{split}.json").read_text()))
        assert listed.classes == CLASS_NAMES[name]
    trainval = load_split(out, "list", "trainval").samples
    assert trainval == load_split(out, "list", "train").samples + load_split(out, "list", "val").samples


def test_vpt_json_in_source_by_default_and_checked_against_the_archive(tmp_path):
    source = make_fake("cub", tmp_path)
    official = fgvc.read_official("cub", source).splits
    make_vpt_json("cub", source, official)
    assert fgvc.read_vpt_json("cub", source).splits["test"] == official["test"]

    (source / "classes.txt").unlink()  # no archive metadata: names are VPT's class ids
    assert fgvc.read_vpt_json("cub", source).classes == [str(source_id("cub", y)) for y in range(3)]

    source = make_fake("cub", tmp_path / "again")
    make_vpt_json("cub", source, official)
    test = json.loads((source / "test.json").read_text())
    first, second = sorted(test)[0], sorted(test)[-1]
    test[first], test[second] = test[second], test[first]  # two test images swap labels
    (source / "test.json").write_text(json.dumps(test))
    with pytest.raises(ValueError, match="VPT's JSON labels 2 images differently from the CUB-200-2011"):
        fgvc.read_vpt_json("cub", source)


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("name", "options", "remove", "error", "fragments"),
    [
        (
            "cub",
            {},
            "images.txt",
            FileNotFoundError,
            ["images.txt not found in", "extracted CUB-200-2011 folder"],
        ),
        (
            "nabirds",
            {},
            "train_test_split.txt",
            FileNotFoundError,
            ["train_test_split.txt not found", "nabirds/"],
        ),
        (
            "flowers",
            {},
            "setid.mat",
            FileNotFoundError,
            ["setid.mat not found", "imagelabels.mat and setid.mat"],
        ),
        ("dogs", {}, "test_list.mat", FileNotFoundError, ["test_list.mat not found", "lists.tar"]),
        (
            "cars",
            {},
            "cars_test_annos_withlabels.mat",
            FileNotFoundError,
            ["cars_test_annos.mat has no labels"],
        ),
        ("cars", {}, "devkit/cars_meta.mat", FileNotFoundError, ["cars_meta.mat not found in", "devkit"]),
        (
            "cub",
            {},
            "images/002.Bird_2/Bird_4.jpg",
            FileNotFoundError,
            ["1 listed images are missing", "images/002.Bird_2/Bird_4.jpg", "Extract the image archive"],
        ),
        ("dogs", {}, "Images", FileNotFoundError, ["15 listed images are missing", "and 12 more"]),
    ],
)
def test_missing_archive_files_are_named_with_the_fix(name, options, remove, error, fragments, tmp_path):
    source = make_fake(name, tmp_path, **options)
    target = source / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    before = tree(source)
    with pytest.raises(error) as caught:
        fgvc.prepare(name, source)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert tree(source) == before  # nothing written


def test_bad_arguments_and_json_are_named(tmp_path):
    source = make_fake("flowers", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder: point --source at the extracted Oxford"):
        fgvc.prepare("flowers", source / "nowhere")
    with pytest.raises(ValueError, match="Unknown splits 'paper'"):
        fgvc.prepare("flowers", source, splits="paper")
    with pytest.raises(FileNotFoundError, match=r"train.json not found in .*pass --json_dir DIR"):
        fgvc.prepare("flowers", source, splits="vpt")
    for name, text, message in [
        ("train.json", "{", "is not valid JSON"),
        ("train.json", "[]", "must be a non-empty"),
        (
            "train.json",
            '{"jpg/image_00001.jpg": "bird"}',
            "class id 'bird' of 'jpg/image_00001.jpg' is not an",
        ),
        ("val.json", '{"jpg/image\\n1.jpg": 1}', "An image path of val holds a line break"),
    ]:
        make_vpt_json("flowers", source, fgvc.read_official("flowers", source).splits)
        (source / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            fgvc.prepare("flowers", source, splits="vpt")
    assert not (source / fgvc.OUTPUT_DIR).exists()


def test_malformed_bird_metadata_is_named(tmp_path):
    source = make_fake("cub", tmp_path)
    flags = source / "train_test_split.txt"
    flags.write_text(flags.read_text().replace(" 1\n", " 0\n"))
    with pytest.raises(ValueError, match=r"The train split of CUB-200-2011 in .* is empty"):
        fgvc.prepare("cub", source)
    flags.write_text(flags.read_text().replace(" 0\n", " yes\n", 1))
    with pytest.raises(ValueError, match=r"flags image 1 with 'yes', not 1 \(train\) or 0"):
        fgvc.prepare("cub", source)
    (source / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(ValueError, match=r"14 image ids of .*images.txt \(e.g. 2\) have no class"):
        fgvc.prepare("cub", source)


def test_mat_files_without_scipy_name_the_install(tmp_path, monkeypatch):
    source = make_fake("cars", tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now raises ImportError
    with pytest.raises(
        ModuleNotFoundError, match=r"cars_meta.mat needs scipy: pip install scipy .*selfprompt\[fgvc\]"
    ):
        fgvc.read_official("cars", source)
    fgvc.read_official("cub", make_fake("cub", tmp_path))  # the text-file archives need no scipy


def test_corrupt_mat_file_is_named(tmp_path):
    source = make_fake("flowers", tmp_path)
    for content in (b"", b"not a MATLAB file" * 20):
        (source / "setid.mat").write_bytes(content)
        with pytest.raises(
            ValueError, match=r"Cannot read .*setid.mat as a MATLAB file .*download and extract"
        ):
            fgvc.prepare("flowers", source)
    assert not (source / fgvc.OUTPUT_DIR).exists()


def test_prepared_lists_feed_the_training_splits(tmp_path):
    out = prepare("dogs", make_fake("dogs", tmp_path))
    names = {"train_split": "train", "val_split": "val", "trainval_split": "trainval", "test_split": "test"}
    splits = build_splits(DataConfig(root=str(out), **names), tiny_vit())
    assert [len(d) for d in (splits.train, splits.val, splits.trainval, splits.test)] == [6, 3, 9, 6]
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and label == 0 and splits.test.classes == CLASS_NAMES["dogs"]


def test_overlapping_splits_are_refused(tmp_path):
    source = make_fake("flowers", tmp_path)
    official = fgvc.read_official("flowers", source).splits
    make_vpt_json("flowers", source, {**official, "val": official["val"] + official["train"][:1]})
    with pytest.raises(ValueError, match="1 images are in both train and val"):
        fgvc.prepare("flowers", source, splits="vpt")


def test_full_class_count_prepares_without_warning(tmp_path):
    source = make_fake("flowers", tmp_path, num_classes=102, per_class=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fgvc.prepare("flowers", source)
    assert len(lines(out / "classes.txt")) == 102 and len(lines(out / "test.txt")) == 102


def fake_info(name: str, classes: int, trainval: int, test: int) -> registry.TaskInfo:
    """The registry entry, sized for a fake (real counts would flag every fake)."""
    info = registry.task("fgvc", name)
    return dataclasses.replace(info, num_classes=classes, counts={"trainval": trainval, "test": test})


def test_check_finds_what_is_wrong_in_a_prepared_archive(tmp_path):
    source = make_fake("cub", tmp_path, per_class=5)
    folder = prepare("cub", source)
    info = fake_info("cub", 3, trainval=9, test=6)
    assert check_task(folder, info) == []
    images = sorted((source / "images").rglob("*.jpg"))
    images[0].unlink()
    shutil.copy(images[1], images[1].parent / "stray.jpg")
    images[2].write_bytes(b"\xff\xd8 truncated")
    (folder / "test.txt").write_text("\n".join(lines(folder / "test.txt")[:-1]) + "\n")
    found = {p.kind: p for p in check_task(folder, info)}
    assert set(found) == {"missing", "extra", "corrupt", "count"}
    assert found["missing"].detail.endswith(images[0].relative_to(source).as_posix())
    assert "stray.jpg" in found["extra"].detail and "../images/" in found["extra"].detail
    assert found["count"].detail == "test.txt lists 5 images, cub has 6"
    assert (
        found["count"].fix == f"rebuild its lists: selfprompt data prepare fgvc --task cub --source {source}"
    )


def test_cli_prepares_checks_and_trains_by_task_name(tmp_path, capsys):
    source = make_fake("cub", tmp_path, num_classes=200, per_class=4)
    assert main(["data", "prepare", "fgvc", "--task", "cub", "--source", str(source)]) == 0
    assert (
        main(["data", "check", str(tmp_path), "--benchmark", "fgvc"]) == 1
    )  # a 200-class fake, not CUB's sizes
    out = capsys.readouterr().out
    assert "trainval.txt lists 400 images, cub has 5994" in out and "missing" not in out
    cfg = DataConfig(
        root=str(tmp_path),
        benchmark="fgvc",
        task="cub",
        **dict(zip(SPLIT_FIELDS, fgvc.LIST_SPLITS, strict=True)),
    )
    splits = build_splits(cfg, tiny_vit())
    assert len(splits.classes) == 200 and (len(splits.train), len(splits.val), len(splits.test)) == (
        200,
        200,
        400,
    )


@pytest.mark.slow
def test_bench_on_a_fake_fgvc_copy_fills_every_column(tmp_path):
    make_fake("cub", tmp_path / "fgvc", num_classes=200, per_class=4)
    fgvc.prepare("cub", tmp_path / "fgvc" / fgvc.ROOT_FOLDERS["cub"])
    recipe = yaml.safe_load((REPO / "recipes" / "fgvc" / "mae" / "spt_shallow.yaml").read_text())
    recipe["model"] |= {"backbone": "vit_mini_patch4_32.mae_fmnist", "pool": "avg", "num_prompts": 2}
    recipe["data"] |= {"batch_size": 50, "num_workers": 0, "crop_pct": 1.0}
    (tmp_path / "recipes" / "mae").mkdir(parents=True)
    (tmp_path / "recipes" / "mae" / "spt_shallow.yaml").write_text(yaml.safe_dump(recipe))
    cfg = BenchConfig(
        root=str(tmp_path / "fgvc"), benchmark="fgvc", output_dir=str(tmp_path / "bench"),
        methods=["spt-shallow"], backbones=["mae"], recipes=str(tmp_path / "recipes"), seeds=[0], epochs=1,
        device="cpu",
    )  # fmt: skip
    rows = bench(cfg, log=lambda _: None)
    assert [r["task"] for r in rows] == ["cub"] and rows[0]["group"] == "fgvc"
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "# FGVC bench" in table and "| task | spt-shallow | spt-shallow (paper) |" in table
    cub = next(line for line in table.splitlines() if line.startswith("| cub (fgvc) |"))
    mean = next(line for line in table.splitlines() if line.startswith("| **fgvc** |"))
    assert cub.endswith("± 0.00 | 71.15 |") and mean.endswith("± 0.00 | 73.95 |")
