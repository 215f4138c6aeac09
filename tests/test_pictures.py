"""The pictures of a run (curves.png in every stage, eval --plot, predict --grid, sweep.png): each PNG is
written with a JSON sidecar of the numbers it drew, read back here against the run's own files."""

import csv
import json

from selfprompt.cli import main

import pytest
from engine_helpers import cli_args, make_dataset
from PIL import Image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pictures")
    data = make_dataset(tmp / "data")
    out = tmp / "run"
    args = [*cli_args(data, out), "--stage", "both", "--optim.epochs", "2", "--optim.warmup_epochs", "0"]
    assert main(["train", *args]) == 0
    return data, out


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_draws_the_curves_of_its_metrics(trained):
    _, out = trained
    for stage, split in (("tune", "val_acc"), ("final", "test_acc")):
        folder = out / "seed0" / stage
        drawn = json.loads((folder / "curves.plot.json").read_text())
        rows = read_rows(folder / "metrics.jsonl")
        assert Image.open(folder / "curves.png").format == "PNG"
        assert drawn["epoch"] == [r["epoch"] for r in rows] == [1, 2]
        assert drawn["train_loss"] == [r["train_loss"] for r in rows]
        assert drawn["lr"] == [r["lr"] for r in rows]
        assert drawn[split] == [[r["epoch"], r[split]] for r in rows if split in r]


def test_no_curves_when_plots_is_off(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [*cli_args(data, out), "--stage", "tune", "--optim.epochs", "1", "--plots", "false"]
    assert main(["train", *args]) == 0
    assert (out / "seed0" / "tune" / "result.json").is_file()
    assert not (out / "seed0" / "tune" / "curves.png").exists()


def test_eval_plot_draws_the_confusion_matrix_eval_counted(trained, capsys):
    _, out = trained
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "test", "--plot", "true"]) == 0
    scores = json.loads(capsys.readouterr().out)
    folder = out / "seed0" / "final"
    drawn = json.loads((folder / "confusion_test.plot.json").read_text())
    matrix = drawn["confusion"]
    assert scores["plot"] == str(folder / "confusion_test.png") and Image.open(scores["plot"]).format == "PNG"
    assert drawn["classes"] == json.loads((folder / "classes.json").read_text())
    assert sum(map(sum, matrix)) == scores["images"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / scores["images"] == pytest.approx(scores["acc"])
    for index, (row, accuracy) in enumerate(zip(matrix, drawn["per_class_accuracy"], strict=True)):
        assert accuracy == pytest.approx(row[index] / sum(row))
    table = list(csv.reader((folder / "confusion_test.csv").open()))
    assert table[0][1:-1] == drawn["classes"] and [list(map(int, r[1:-1])) for r in table[1:]] == matrix


def test_predict_grid_shows_each_image_with_its_top_class(trained, tmp_path):
    data, out = trained
    grid, predictions = tmp_path / "grid.png", tmp_path / "p.json"
    args = [str(out), str(data / "test"), "--output", str(predictions), "--grid", str(grid)]
    assert main(["predict", *args]) == 0
    rows = json.loads(predictions.read_text())
    captions = json.loads(grid.with_suffix(".plot.json").read_text())["captions"]
    assert Image.open(grid).format == "PNG" and len(captions) == min(48, len(rows))
    for row, caption in zip(rows, captions, strict=False):
        name, label = caption.split("\n")
        assert name == row["path"].split("/")[-1]
        assert label == f"{row['class']} ({100 * row['probability']:.0f}%)"
