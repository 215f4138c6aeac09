"""`selfprompt bench`: the grid, resumption without recomputation, and the VTAB aggregates."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from pathlib import Path

from selfprompt.apps import report
from selfprompt.apps.bench import BenchConfig, Cell, bench, cell_search, grid
from selfprompt.apps.report import TASK_MEAN, VTAB_MEAN, aggregate
from selfprompt.cli import build_parser
from selfprompt.data import vtab_mini
from selfprompt.methods import get_method, method_names

import pytest
import yaml
from conftest import small_vtab_mini


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """One small dsprites_location task (128 train+val, 128 test) read by every bench test of this module:
    the grid, resumption and the reports do not depend on how many images a cell trains and tests on."""
    root = tmp_path_factory.mktemp("vtab-mini")
    with small_vtab_mini():
        vtab_mini.prepare(root, ["dsprites_location"], log=lambda _: None)
    return root


def row(task: str, seed: int, acc: float, variant: str = "linear") -> dict:
    return {"backbone": "b", "variant": variant, "task": task, "seed": seed, "test_acc": acc}


def test_vtab_means_follow_both_conventions_per_seed():
    # natural: mnist; specialized: textile; structured: two tasks
    accs = {
        0: {"mnist": 0.9, "textile": 0.6, "clevr_count": 0.3, "dsprites_location": 0.5},
        1: {"mnist": 0.8, "textile": 0.7, "clevr_count": 0.4, "dsprites_location": 0.7},
    }
    table = aggregate([row(t, s, a) for s, per_task in accs.items() for t, a in per_task.items()])[
        ("b", "linear")
    ]
    structured = {s: (a["clevr_count"] + a["dsprites_location"]) / 2 for s, a in accs.items()}
    vtab = [100 * statistics.fmean([a["mnist"], a["textile"], structured[s]]) for s, a in accs.items()]
    over_tasks = [100 * statistics.fmean(a.values()) for a in accs.values()]
    assert table[VTAB_MEAN][0] == pytest.approx(statistics.fmean(vtab))
    assert table[VTAB_MEAN][1] == pytest.approx(statistics.stdev(vtab))
    assert table[TASK_MEAN][0] == pytest.approx(statistics.fmean(over_tasks))
    assert table["structured"][0] == pytest.approx(100 * statistics.fmean([0.4, 0.55]))
    assert table["mnist"] == pytest.approx((85.0, statistics.stdev([90.0, 80.0]), 2))


def test_grid_sweeps_only_where_a_setting_applies(mini):
    cfg = BenchConfig(
        root=str(mini), methods=["linear", "vpt-deep", "spt-deep"], backbones=["b"], seeds=[0, 1],
        inits=["kmeans", "mean_pool"], num_prompts=[1, 5],
    )  # fmt: skip
    cells = grid(cfg)
    # linear once; vpt-deep per length; spt-deep per initializer and length; all of seed 0 first
    assert len(cells) == 2 * (1 + 2 + 4)
    assert [c.seed for c in cells] == [0] * 7 + [1] * 7
    assert Cell("b", "dsprites_location", "spt-deep", 0, "mean_pool", 5).variant == "spt-deep[mean_pool,M=5]"
    with pytest.raises(FileNotFoundError, match="data prepare vtab-mini"):
        grid(BenchConfig(root=str(mini), tasks=["mnist"]))
    # pc: one cell per share kept, plus the vpt-deep cell it condenses, asked for or not; final stage only
    pc = grid(BenchConfig(root=str(mini), methods=["pc"], backbones=["b"], seeds=[0], keep=[0.5, 0.25]))
    assert [c.variant for c in pc] == ["pc[keep=0.5]", "pc[keep=0.25]", "vpt-deep"]
    assert {c.source for c in pc} == {Cell("b", "dsprites_location", "vpt-deep", 0), None}
    with pytest.raises(ValueError, match="Run them with --stage final"):
        grid(BenchConfig(root=str(mini), methods=["pc"], backbones=["b"], stage="both"))


@pytest.mark.slow
def test_bench_runs_cells_once_and_reports(tmp_path, mini):
    cfg = BenchConfig(
        root=str(mini), output_dir=str(tmp_path / "bench"), methods=["linear", "spt-deep", "bitfit", "pc"],
        backbones=["vit_mini_patch4_32.mae_fmnist"], seeds=[0], epochs=1, device="cpu", num_workers=0,
        keep=[0.5],
    )  # fmt: skip
    lines: list[str] = []
    rows = bench(cfg, log=lines.append)
    assert [r["variant"] for r in rows] == ["linear", "spt-deep", "bitfit", "pc[keep=0.5]", "vpt-deep"]
    assert rows[3]["trainable_parameters"] == rows[4]["trainable_parameters"] - 6 * 10 * 128 // 2
    assert all(0 <= r["test_acc"] <= 1 and r["epochs"] == 1 for r in rows)
    assert rows[0]["trainable_parameters"] < rows[1]["trainable_parameters"] < rows[2]["trainable_parameters"]
    records = sorted(Path(cfg.output_dir).glob("cells/**/cell.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    again = bench(cfg, log=lambda _: None)
    assert again == rows and [p.stat().st_mtime_ns for p in records] == stamps  # nothing recomputed
    report = (Path(cfg.output_dir) / "results.md").read_text()
    assert VTAB_MEAN in report and "dsprites_location (structured)" in report
    assert "## Paired differences" in report and "| linear - spt-deep | 1 |" in report
    assert (Path(cfg.output_dir) / "cells.csv").read_text().count("\n") == 6


@pytest.mark.slow
def test_cells_run_as_submitit_jobs_and_are_not_recomputed(tmp_path, mini):
    """The slurm code path through submitit's local executor (jobs on this machine)."""
    cfg = BenchConfig(
        root=str(mini), output_dir=str(tmp_path / "bench"), methods=["linear"], seeds=[0, 1],
        backbones=["vit_mini_patch4_32.mae_fmnist"], epochs=1, device="cpu", num_workers=0, workers=2,
        launcher="submitit", slurm={"timeout_min": 10},
    )  # fmt: skip
    rows = bench(cfg, log=lambda _: None)
    assert [r["seed"] for r in rows] == [0, 1] and all(0 <= r["test_acc"] <= 1 for r in rows)
    assert len(list((tmp_path / "bench" / "jobs").glob("*/*_result.pkl"))) == 2  # submitit's own records
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "bench").glob("cells/**/cell.json"))]
    assert bench(cfg, log=lambda _: None) == rows
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "bench").glob("cells/**/cell.json"))] == stamps
    assert len(list((tmp_path / "bench" / "jobs").glob("*/*_result.pkl"))) == 2, "no job for a finished cell"


def test_search_grids_come_from_the_methods_or_the_command(tmp_path):
    (tmp_path / "dsprites_location").mkdir()
    (tmp_path / "dsprites_location" / "test.txt").write_text("")
    cfg = BenchConfig(
        root=str(tmp_path), methods=["linear", "lora"], backbones=["b"], seeds=[0], search="default"
    )
    cells = grid(cfg)
    assert [cell_search(cfg, c) for c in cells] == [
        get_method("linear").search.grid,
        get_method("lora").search.grid,
    ]
    assert all(get_method(m).search.source for m in method_names() if get_method(m).search)
    with pytest.raises(ValueError, match=r"\['pc'\] with --search"):
        grid(BenchConfig(root=str(tmp_path), methods=["pc"], backbones=["b"], search={"optim.lr": [0.1]}))
    per_method = {"linear": {"optim.lr": [0.1]}, "lora": {"optim.lr": [0.01, 0.001]}}
    cfg = dataclasses.replace(cfg, search=per_method)
    assert [cell_search(cfg, c) for c in grid(cfg)] == list(per_method.values())
    with pytest.raises(ValueError, match=r"grids per method.*missing: \['lora'\]"):
        grid(dataclasses.replace(cfg, search={"linear": {"optim.lr": [0.1]}}))
    parsed = build_parser().parse_args(["bench", "--root", "r", "--search", "default"])
    assert parsed.bench.search == "default"
    parsed = build_parser().parse_args(["bench", "--root", "r", "--search", '{"optim.lr": [0.1, 0.01]}'])
    assert parsed.bench.search == {"optim.lr": [0.1, 0.01]}
    parsed = build_parser().parse_args(["bench", "--root", "r", "--search", json.dumps(per_method)])
    assert parsed.bench.search == per_method


@pytest.mark.slow
def test_a_searched_cell_is_a_sweep_recorded_with_its_choice(tmp_path, mini):
    search = {"optim.lr": [0.05, 0.001]}
    cfg = BenchConfig(
        root=str(mini), output_dir=str(tmp_path / "bench"), methods=["linear"], search=search,
        backbones=["vit_mini_patch4_32.mae_fmnist"], seeds=[0], epochs=1, device="cpu", num_workers=0,
    )  # fmt: skip
    (row,) = bench(cfg, log=lambda _: None)
    sweep = json.loads(
        (
            Path(cfg.output_dir) / "cells" / row["backbone"] / row["task"] / "linear" / "seed0" / "sweep.json"
        ).read_text()
    )
    assert row["search"] == search and row["chosen"] == sweep["best"]["params"]
    assert row["val_acc"] == sweep["best"]["val_acc"] and row["test_acc"] == sweep["final"]["test_acc"]
    assert len(sweep["trials"]) == 2 and all(t["state"] == "COMPLETE" for t in sweep["trials"])
    assert bench(cfg, log=lambda _: None) == [row]  # read, not recomputed
    with pytest.raises(ValueError, match="use another --output_dir for another protocol"):
        bench(dataclasses.replace(cfg, search=None), log=lambda _: None)


@pytest.mark.slow
def test_later_seeds_train_the_setting_the_first_seed_chose(tmp_path, mini):
    search = {"optim.lr": [0.05, 0.001]}
    cfg = BenchConfig(
        root=str(mini), output_dir=str(tmp_path / "bench"), methods=["linear"], search=search,
        search_seeds="first", backbones=["vit_mini_patch4_32.mae_fmnist"], seeds=[3, 1], epochs=1,
        device="cpu", num_workers=0,
    )  # fmt: skip
    rows = {r["seed"]: r for r in bench(cfg, log=lambda _: None)}
    first, later = (
        Path(cfg.output_dir) / "cells" / rows[3]["backbone"] / rows[3]["task"] / "linear" / f"seed{s}"
        for s in (3, 1)
    )
    best = json.loads((first / "sweep.json").read_text())["best"]
    assert not (later / "sweep.json").exists()  # no tune stage of its own
    assert rows[1]["chosen"] == rows[3]["chosen"] == best["params"] and rows[1]["searched_seed"] == 3
    config = yaml.safe_load((later / "config.yaml").read_text())
    assert config["optim"]["lr"] == best["params"]["optim.lr"] and config["seeds"] == [1]  # its own seed
    with pytest.raises(ValueError, match=r"\(on seed 3\), this bench asks for .* \(on seed 1\)"):
        bench(dataclasses.replace(cfg, search_seeds="each"), log=lambda _: None)


def test_cells_of_an_older_release_and_new_columns_share_one_csv():
    older = {"variant": "linear", "test_acc": 0.5}
    newer = {"variant": "pc[keep=0.3]", "test_acc": 0.6, "keep": 0.3}
    rows = list(csv.DictReader(io.StringIO(report._csv([older, newer]))))
    assert rows == [
        {"variant": "linear", "test_acc": "0.5", "keep": ""},
        {**newer, "test_acc": "0.6", "keep": "0.3"},
    ]
