"""A stage's result on disk (StageResult) and the one reader of a finished run (find_stage)."""

import json

from selfprompt.apps import predict
from selfprompt.engine.build import build_model, create_backbone
from selfprompt.engine.lifecycle import config_dict
from selfprompt.engine.result import StageResult
from selfprompt.engine.run import summarize
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.trained import find_stage, load_run_model, stage_order
from selfprompt.serving import sources
from selfprompt.serving.sources import resolve_source

import pytest
import torch
from engine_helpers import tiny_config

TUNE = {  # result.json as every release wrote it, key for key and in this order
    "stage": "tune", "seed": 0, "epochs": 3, "last_val_acc": 0.5, "best_val_acc": 0.625, "best_epoch": 2,
    "trainable_parameters": 1234, "trainable_share": 0.01, "seconds_per_epoch": 1.5, "peak_memory_mb": 0.0,
    "selected_on_test": False,
}  # fmt: skip
FINAL = {
    **{k: v for k, v in TUNE.items() if not k.endswith("_acc")},
    "stage": "final", "last_test_acc": 0.75, "best_test_acc": 0.75, "selected_on_test": False,
    "last_ema_test_acc": 0.7,
}  # fmt: skip
FINAL = {
    k: FINAL[k]
    for k in [*list(TUNE)[:3], "last_test_acc", "best_test_acc", *list(TUNE)[5:], "last_ema_test_acc"]
}


@pytest.mark.parametrize("record", [TUNE, FINAL], ids=["tune", "final-with-ema"])
def test_a_stage_result_round_trips_through_result_json_byte_for_byte(record, tmp_path):
    (tmp_path / "result.json").write_text(json.dumps(record, indent=2))
    result = TrainingDir(tmp_path).read_result()
    assert result.last_acc == record[f"last_{result.eval_split}_acc"] and result.eval_split in ("val", "test")
    assert (result.last_ema_acc is None) == (record is TUNE)
    assert list(result.to_json().items()) == list(record.items())
    copy = TrainingDir(tmp_path / "copy")
    copy.path.mkdir()
    copy.write_result(result)
    assert json.loads(copy.result.read_text()) == record and copy.read_result() == result


def test_the_summary_reports_each_stages_headline_under_its_old_key():
    results = [StageResult.from_json(TUNE), StageResult.from_json(FINAL)]
    summary = summarize(results)
    assert summary["tune"]["best_val_acc"]["mean"] == 0.625
    assert summary["final"]["last_test_acc"]["mean"] == 0.75
    on_test = StageResult.from_json({**FINAL, "selected_on_test": True, "best_test_acc": 0.8})
    assert summarize([on_test])["final"]["best_test_acc"]["mean"] == 0.8


def test_a_damaged_result_json_is_named(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"stage": "tune"}))
    with pytest.raises(ValueError, match=r"result\.json is not a stage result"):
        TrainingDir(tmp_path).read_result()


def _fake_run(tmp_path, stages):
    """A run folder whose stages hold an adapter each (weights told apart by a constant), no training."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", "linear")
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_config(config_dict(cfg))
    backbone = create_backbone(cfg.model)
    for value, stage in enumerate(stages, start=1):
        model = build_model(cfg, backbone, 3)
        torch.nn.init.constant_(model.head.weight, float(value))
        folder = run.stage(0, stage)
        model.save_pretrained(folder.adapter())
        folder.write_classes(["a", "b", "c"])
    return run


def test_the_one_reader_picks_final_else_tune_and_serving_and_predict_use_it(tmp_path, monkeypatch):
    assert stage_order(None) == ("final", "tune") and stage_order("tune") == ("tune",)
    run = _fake_run(tmp_path, ["tune"])
    assert find_stage(run.path).stage == "tune"
    assert resolve_source(run.path).adapter == run.stage(0, "tune").adapter()
    with pytest.raises(FileNotFoundError, match="stage final has not finished"):
        find_stage(run.path, stage="final")
    run.stage(0, "final").adapter().mkdir(parents=True)  # started, no adapter_config.json: not finished
    assert find_stage(run.path).stage == "tune"

    run = _fake_run(tmp_path / "both", ["tune", "final"])
    found = find_stage(run.path)
    assert (found.stage, found.seed, found.adapter) == ("final", 0, run.stage(0, "final").adapter())
    assert resolve_source(run.path).adapter == found.adapter
    assert resolve_source(run.path, stage="tune").adapter == run.stage(0, "tune").adapter()
    _, model, classes = load_run_model(run.path, None, None, "cpu")
    assert classes == ["a", "b", "c"] and bool((model.head.weight == 2.0).all())

    calls = []
    monkeypatch.setattr(sources, "find_stage", lambda *a: calls.append(a) or find_stage(*a))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    rows = predict.predict_run(run.path, [str(image)], None, None, "cpu")
    assert calls == [(run.path, None, None, False)] and rows[0]["class"] in classes
