"""The benchmark registry: what each benchmark registers, and that a new one needs no other module."""

from pathlib import Path

from selfprompt.cli import main
from selfprompt.config import ConfigError, TrainConfig, check_config
from selfprompt.data import registry
from selfprompt.data.config import DataConfig
from selfprompt.data.registry import Benchmark, PrepareOptions, TaskInfo
from selfprompt.data.splits import task_root

import pytest


def test_the_registry_holds_exactly_the_three_benchmarks_with_their_groups_and_splits():
    assert registry.names() == ("vtab-1k", "fgvc", "vtab-mini")
    vtab_groups = ("natural", "specialized", "structured")
    vtab_splits = ("train800", "val200", "train800val200", "test")
    expected = {
        "vtab-1k": ("VTAB-1k", vtab_groups, vtab_splits, 19, "recipes/vtab"),
        "fgvc": ("FGVC", ("fgvc",), ("train", "val", "trainval", "test"), 5, "recipes/fgvc"),
        "vtab-mini": ("VTAB-mini", vtab_groups, vtab_splits, 8, None),
    }
    for name, (title, groups, splits, count, recipes) in expected.items():
        b = registry.benchmark(name)
        assert (b.title, b.groups, b.splits, len(registry.tasks(name))) == (title, groups, splits, count)
        assert b.tune_splits == splits[:2] and b.final_splits == splits[2:]
        assert all(
            t.benchmark == name and t.group in groups and t.splits == splits
            for t in registry.tasks(name).values()
        )
        assert b.recipes == recipes if recipes else Path(b.recipes, "spt_deep.yaml").is_file()
    assert [registry.benchmark(n).check_before_training for n in registry.names()] == [False, False, True]


def test_an_unknown_benchmark_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(
        ValueError,
        match=r"Unknown benchmark 'vtab'; did you mean .*benchmarks: \['vtab-1k', 'fgvc', 'vtab-mini'\]",
    ):
        registry.benchmark("vtab")
    cfg = TrainConfig(data=DataConfig(root="x", benchmark="imagenet", task="a"))
    known = r"one of vtab-1k, fgvc or vtab-mini \(selfprompt data list\), got 'imagenet'"
    with pytest.raises(ConfigError, match=rf"data.benchmark must be a registered benchmark, {known}"):
        check_config(cfg)
    with pytest.raises(SystemExit):
        main(["data", "prepare", "imagenet", "--root", "x"])
    assert "vtab-1k" in capsys.readouterr().err


@pytest.fixture
def fourth(tmp_path):
    """A fourth benchmark, registered by the test alone and removed afterwards."""
    prepared = []

    def prepare(options: PrepareOptions, log) -> None:
        prepared.append(options.root)
        log(f"Wrote {options.root}")

    info = TaskInfo("blobs", "toy", "shapes", 3, "blob count", "blobs", ("tr", "va", "trva", "te"))
    benchmark = Benchmark(
        "toy", "Toy", ("shapes",), info.splits, lambda: {"blobs": info}, prepare, ("root",),
        lambda folder, task: f"rebuild it: toy {task.name}", recipes=str(tmp_path / "recipes"),
    )  # fmt: skip
    registry.register_benchmark(benchmark)
    try:
        yield prepared
    finally:
        registry.unregister_benchmark("toy")
    assert "toy" not in registry.names()


def test_a_registered_fourth_benchmark_is_usable_without_touching_other_modules(fourth, tmp_path, capsys):
    assert registry.names()[-1] == "toy"
    check_config(TrainConfig(data=DataConfig(root=str(tmp_path), benchmark="toy", task="blobs")))
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "classes.txt").write_text("one\ntwo\nthree\n")
    assert task_root(DataConfig(root=str(tmp_path), benchmark="toy", task="blobs", test_split="te")) == (
        tmp_path / "blobs",
        ["one", "two", "three"],
    )
    assert main(["data", "prepare", "toy", "--root", str(tmp_path / "out")]) == 0
    assert fourth == [str(tmp_path / "out")]
    assert main(["data", "list", "--benchmark", "toy"]) == 0
    assert "blobs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already registered"):
        registry.register_benchmark(registry.benchmark("toy"))
