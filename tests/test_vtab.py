"""VTAB-1k without TensorFlow: VTAB's split definitions as pure functions, labels, the extracted layout
written from a TFDS-like source, training on it by task name, and `data check` finding what is wrong."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from selfprompt.apps.bench import RECIPES, BenchConfig, bench
from selfprompt.cli import main
from selfprompt.config import DataConfig
from selfprompt.data import registry, vtab
from selfprompt.data.check import check_task
from selfprompt.data.splits import build_splits

import numpy as np
import pytest
import yaml
from conftest import tiny_vit
from vtab_fakes import TFDS_SIZES, FakeSource, make_vtab_copy


def count(slices: list[tuple[str, int, int]]) -> int:
    return sum(stop - start for _, start, stop in slices)


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_split_definitions_give_vtab_1k_sizes(name):
    task = vtab.TASKS[name]
    slices = vtab.split_slices(task, TFDS_SIZES[name])
    assert {split: count(s) for split, s in slices.items()} == vtab.expected_counts(task)
    assert slices["train800"] == [("train", 0, 800)]
    assert slices["train800val200"] == slices["train800"] + slices["val200"]
    # val200 and test never overlap train800, nor each other
    ranges = [r for split in ("train800", "val200", "test") for r in slices[split]]
    for i, (a, a0, a1) in enumerate(ranges):
        for b, b0, b1 in ranges[i + 1 :]:
            assert a != b or a1 <= b0 or b1 <= a0


def test_split_definitions_match_task_adaptation():
    sizes = TFDS_SIZES
    assert vtab.split_slices(vtab.TASKS["svhn"], sizes["svhn"])["val200"] == [("train", 65931, 66131)]
    assert vtab.split_slices(vtab.TASKS["oxford_iiit_pet"], sizes["oxford_iiit_pet"])["val200"] == [
        ("train", 2944, 3144)
    ]
    dsprites = vtab.split_slices(vtab.TASKS["dsprites_loc"], sizes["dsprites_loc"])
    assert dsprites["val200"] == [("train", 589824, 590024)]
    assert dsprites["test"] == [("train", 663552, 737280)]
    norb = vtab.split_slices(vtab.TASKS["smallnorb_ele"], sizes["smallnorb_ele"])
    assert norb["val200"] == [("test", 0, 200)] and norb["test"] == [("test", 12150, 24300)]
    assert vtab.split_slices(vtab.TASKS["clevr_count"], sizes["clevr_count"])["test"] == [
        ("validation", 0, 15000)
    ]
    assert vtab.split_slices(vtab.TASKS["eurosat"], sizes["eurosat"])["test"] == [("train", 21600, 27000)]
    assert vtab.split_slices(vtab.TASKS["dtd"], sizes["dtd"])["val200"] == [("validation", 0, 200)]


def test_a_source_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"lacks the TFDS split\(s\) \['validation'\]"):
        vtab.split_slices(vtab.TASKS["dtd"], {"train": 1880, "test": 1880})
    with pytest.raises(
        ValueError, match=r"needs train\[0:800\] .* has 500 examples; is this the TFDS builder"
    ):
        vtab.split_slices(vtab.TASKS["kitti"], {"train": 500, "validation": 423, "test": 711})


def test_labels_follow_vtab_preprocessing():
    tasks = vtab.TASKS
    clevr = {"objects": {"size": np.zeros(5), "pixel_coords": np.array([[0, 0, 9.2], [0, 0, 8.7]] * 2)}}
    assert tasks["clevr_count"].label({"objects": {"size": np.zeros(10)}}) == 7
    assert tasks["clevr_dist"].label(clevr) == 2  # closest at 8.7: bin (8.5, 9]
    car_far_person_near = {
        "objects": {"type": np.array([0, 4]), "location": np.array([[0, 0, 30.0], [0, 0, 2]])}
    }
    assert tasks["kitti"].label(car_far_person_near) == 2  # only vehicles count: 30 m is in (20, 999]
    assert (
        tasks["kitti"].label({"objects": {"type": np.array([5]), "location": np.array([[0, 0, 2.0]])}}) == 3
    )
    assert tasks["dsprites_loc"].label({"label_x_position": 31}) == 15
    assert tasks["dsprites_ori"].label({"label_orientation": 39}) == 15
    assert tasks["dsprites_ori"].label({"label_orientation": 3}) == 1
    mask = tasks["dsprites_loc"].image({"image": np.ones((4, 4, 1), dtype=np.uint8)})
    assert mask.shape == (4, 4, 3) and mask.max() == 255


def test_prepare_writes_each_task_from_its_source(tmp_path):
    small = {"kitti": None, "smallnorb_ele": {"train": 1000, "test": 600}}
    folders = vtab.prepare(
        tmp_path, list(small), source=lambda t: FakeSource(t.name, small[t.name]), log=print
    )
    assert [f.name for f in folders] == ["kitti", "smallnorb_ele"]
    manifest = json.loads((tmp_path / "smallnorb_ele" / "manifest.json").read_text())
    assert manifest["counts"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 300}
    assert manifest["slices"]["test"] == [["test", 300, 600]]
    with pytest.raises(ValueError, match=r"Unknown VTAB-1k tasks \['cifar'\]"):
        vtab.prepare(tmp_path, ["cifar"])


def test_prepare_without_tensorflow_datasets_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'selfprompt\[tfds\]'"):
        vtab.prepare(tmp_path, ["kitti"])
    assert main(["data", "prepare", "vtab-1k", "--root", str(tmp_path), "--tasks", "kitti"]) == 1


@pytest.fixture(scope="module")
def kitti(tmp_path_factory) -> Path:
    return make_vtab_copy(tmp_path_factory.mktemp("vtab-1k"), "kitti")


def test_written_copy_has_vtab_layout_and_is_deterministic(kitti, tmp_path):
    lines = {s: (kitti / f"{s}.txt").read_text().splitlines() for s in vtab.SPLITS}
    assert [len(lines[s]) for s in vtab.SPLITS] == [800, 200, 1000, 711]
    assert lines["train800val200"] == lines["train800"] + lines["val200"]
    assert (
        lines["test"][0] == "images/test/000000.png 0" and lines["val200"][3] == "images/val200/000003.png 3"
    )
    manifest = json.loads((kitti / "manifest.json").read_text())
    assert (
        manifest["slices"]["val200"] == [["validation", 0, 200]] and manifest["source"] == "fake:kitti:3.1.0"
    )
    assert manifest["class_counts"]["test"] == [178, 178, 178, 177]
    again = make_vtab_copy(tmp_path, "kitti")
    assert (again / "manifest.json").read_bytes() == (kitti / "manifest.json").read_bytes()
    assert check_task(kitti, registry.task("vtab-1k", "kitti")) == []


def test_training_data_by_task_name(kitti):
    cfg = DataConfig(root=str(kitti.parent), benchmark="vtab-1k", task="kitti")
    splits = build_splits(cfg, tiny_vit())
    assert splits.classes == ["0", "1", "2", "3"]
    assert (len(splits.train), len(splits.val), len(splits.trainval), len(splits.test)) == (
        800,
        200,
        1000,
        711,
    )
    with pytest.raises(ValueError, match="Unknown vtab-1k task 'kiti'; did you mean"):
        build_splits(DataConfig(root=str(kitti.parent), benchmark="vtab-1k", task="kiti"), tiny_vit())
    with pytest.raises(FileNotFoundError, match=r"neither .*dtd nor .* holds its lists"):
        build_splits(DataConfig(root=str(kitti.parent), benchmark="vtab-1k", task="dtd"), tiny_vit())


def test_train800_missing_classes_still_gets_every_class(tmp_path):
    """VTAB-1k's train800 need not hold every class (caltech101, sun397): the registry sizes the head."""
    folder = make_vtab_copy(tmp_path, "kitti")
    (folder / "classes.txt").unlink()
    train = [line for line in (folder / "train800.txt").read_text().splitlines() if not line.endswith(" 3")]
    (folder / "train800.txt").write_text("\n".join(train) + "\n")
    splits = build_splits(DataConfig(root=str(folder), benchmark="vtab-1k", task="kitti"), tiny_vit())
    assert len(splits.classes) == 4 and max(label for _, label in splits.test.samples) == 3


def problems(folder: Path) -> dict[str, str]:
    return {p.kind: p.detail for p in check_task(folder, registry.task("vtab-1k", "kitti"))}


def test_check_finds_missing_extra_count_and_corrupt(tmp_path):
    folder = make_vtab_copy(tmp_path, "kitti")
    (folder / "images" / "test" / "000005.png").unlink()
    (folder / "images" / "stray.png").write_bytes((folder / "images" / "test" / "000006.png").read_bytes())
    (folder / "images" / "val200" / "000007.png").write_bytes(b"not a png")
    test = (folder / "test.txt").read_text().splitlines()
    (folder / "test.txt").write_text("\n".join(test[:-1]) + "\n")
    found = problems(folder)
    assert found["missing"] == "1 listed images do not exist: images/test/000005.png"
    assert found["extra"] == "2 images are in no split list: images/stray.png, images/test/000710.png"
    assert found["count"] == "test.txt lists 710 images, kitti has 711"
    assert found["corrupt"] == "1 images do not decode: images/val200/000007.png"
    assert main(["data", "check", str(tmp_path)]) == 1


def test_check_finds_a_modified_image_and_a_missing_class(tmp_path, capsys):
    folder = make_vtab_copy(tmp_path, "kitti")
    image = folder / "images" / "train800" / "000001.png"
    other = (folder / "images" / "train800" / "000002.png").read_bytes()
    image.write_bytes(other)
    assert set(problems(folder)) == {"modified"}
    for split in vtab.SPLITS:
        kept = [x for x in (folder / f"{split}.txt").read_text().splitlines() if not x.endswith(" 2")]
        (folder / f"{split}.txt").write_text("\n".join(kept) + "\n")
    assert "1 of the 4 classes occur in no split (e.g. [2])" in problems(folder)["classes"]
    assert main(["data", "check", str(folder), "--benchmark", "vtab-1k", "--tasks", "kitti"]) == 1
    out = capsys.readouterr().out
    assert "kitti: " in out and "rebuild it: selfprompt data prepare vtab-1k" in out


def test_data_list_shows_every_task(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for benchmark in registry.names():
        for name in registry.tasks(benchmark):
            assert name in out
    assert len(registry.tasks("vtab-1k")) == 19
    assert [sum(t.group == g for t in registry.tasks("vtab-1k").values()) for g in vtab.GROUPS] == [7, 4, 8]


@pytest.mark.slow
def test_bench_on_a_fake_vtab_1k_copy_fills_every_column(tmp_path):
    root = tmp_path / "vtab-1k"
    # one task per group; test splits cut to a few hundred images to keep the test quick
    make_vtab_copy(root, "dtd", {"train": 800, "validation": 200, "test": 300})
    make_vtab_copy(root, "eurosat", {"train": 4000})  # test: the last 20%, 800 images
    make_vtab_copy(root, "kitti")
    recipe = yaml.safe_load((RECIPES / "spt_shallow.yaml").read_text())
    recipe["model"] |= {"backbone": "vit_mini_patch4_32.mae_fmnist", "pool": "avg", "num_prompts": 2}
    (tmp_path / "recipes" / "mae").mkdir(parents=True)
    (tmp_path / "recipes" / "mae" / "spt_shallow.yaml").write_text(yaml.safe_dump(recipe))
    cfg = BenchConfig(
        root=str(root), benchmark="vtab-1k", output_dir=str(tmp_path / "bench"), methods=["spt-shallow"],
        backbones=["mae"], recipes=str(tmp_path / "recipes"), seeds=[0], epochs=1, device="cpu",
        num_workers=0, workers=2, overrides=["--prompt.init", "sample"],
    )  # fmt: skip
    rows = bench(cfg, log=lambda _: None)
    assert sorted(r["task"] for r in rows) == ["dtd", "eurosat", "kitti"]
    for cell in (tmp_path / "bench" / "cells" / "mae").glob("*/spt-shallow/seed0"):
        assert (cell / "config.yaml").is_file() and "test" in (cell / "cell.log").read_text()
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| task | spt-shallow | spt-shallow (paper) |" in table and "# VTAB-1k bench" in table
    body = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:]
        for line in table.splitlines()
        if line.startswith("| ")
    }
    for name in ("dtd (natural)", "eurosat (specialized)", "kitti (structured)"):
        assert re.fullmatch(r"\d+\.\d\d ± 0\.00", body[name][0]) and body[name][1].strip(" |") == "–"
    assert body["**natural**"][1].strip(" |") == "62.53" and body["**structured**"][1].strip(" |") == "53.46"
    assert body["**mean over tasks**"][1].strip(" |") == "62.58"
    measured = [float(body[f"{t} ({g})"][0].split(" ")[0]) for t, g in
                (("dtd", "natural"), ("eurosat", "specialized"), ("kitti", "structured"))]  # fmt: skip
    assert float(body["**VTAB mean (of group means)**"][0].split(" ")[0]) == pytest.approx(
        sum(measured) / 3, abs=0.01
    )
