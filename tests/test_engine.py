"""The training engine: methods learn, frozen stays frozen, reproducible, resumable, DDP = one process."""

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time

from selfprompt import PromptedViT, ViTClassifier
from selfprompt.adapter import TaskInfo
from selfprompt.config import TrainConfig
from selfprompt.data.splits import build_splits
from selfprompt.engine import Stage, TrainingDir, run, train_stage
from selfprompt.engine.build import build_model, create_backbone, preparer
from selfprompt.engine.distributed import Context
from selfprompt.engine.lifecycle import changed_fields, config_dict
from selfprompt.engine.optim import param_groups, warmup_cosine
from selfprompt.engine.stage import StageOptions
from selfprompt.methods import get_method, method_names

import pytest
import torch
from engine_helpers import adapter, cli_args, make_dataset, metrics, tiny_config
from safetensors.torch import load_file

CPU = Context(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def quiet(_: str) -> None:
    pass


# pc fine-tunes a condensed run rather than starting from the backbone: tests/test_condensation.py
@pytest.mark.parametrize("method", [m for m in method_names() if not get_method(m).condenses])
def test_every_method_lowers_the_loss_and_only_full_moves_the_backbone(method, data, tmp_path):
    cfg = tiny_config(data, tmp_path, method, **{"optim.epochs": 4})
    backbone = create_backbone(cfg.model)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    splits = build_splits(cfg.data, backbone)
    stage = Stage("tune", splits.train, splits.init_train, "val", splits.val, True, TrainingDir(tmp_path))
    options = StageOptions.of(cfg.optim, cfg.data, cfg, cfg.track, cfg.eval_every)
    build = lambda: build_model(cfg, backbone, 3)  # noqa: E731
    train_stage(stage, options, CPU, build, preparer(cfg), TaskInfo(splits.classes), 0, quiet)
    rows = TrainingDir(tmp_path).read_rows()
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"], rows
    unchanged = all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert unchanged == (method not in ("full", "bitfit"))


def test_cpu_runs_are_bit_for_bit_reproducible(data, tmp_path):
    for name in ("a", "b"):
        run(tiny_config(data, tmp_path / name, **{"prompt.dropout": 0.1}), log=quiet)
    for key, value in adapter(tmp_path / "a").items():
        assert torch.equal(value, adapter(tmp_path / "b")[key]), key
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert metrics(tmp_path / "a", "tune") == metrics(tmp_path / "b", "tune")


def test_protocol_selects_on_val_and_tests_once(data, tmp_path):
    summary = run(tiny_config(data, tmp_path, **{"seeds": [0, 1]}), log=quiet)
    tune, final = metrics(tmp_path, "tune"), metrics(tmp_path, "final")
    assert all("val_acc" in r and "test_acc" not in r for r in tune)
    assert ["test_acc" in r for r in final] == [False, False, True], "test is evaluated once, at the end"
    assert set(summary["tune"]["best_val_acc"]) == {"mean", "std"}
    assert summary["final"]["seeds"] == [0, 1] and not summary["final"]["selected_on_test"]
    assert 0 < summary["trainable_share"] < 0.05
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert {(r["stage"], r["seed"]) for r in results} == {(s, n) for s in ("tune", "final") for n in (0, 1)}
    env = json.loads((tmp_path / "env.json").read_text())
    assert (
        set(env["data_fingerprints"]) == {"train", "val", "trainval", "test"} and "torch" in env["versions"]
    )


def test_selecting_on_test_needs_the_loud_flag_and_is_marked(data, tmp_path, capsys):
    summary = run(tiny_config(data, tmp_path, **{"unsafe_select_on_test": True}), log=print)
    assert all("test_acc" in r for r in metrics(tmp_path, "final"))
    assert summary["final"]["selected_on_test"]
    assert "WARNING" in capsys.readouterr().out


def test_gradient_accumulation_matches_the_same_global_batch(data, tmp_path):
    exact = {"stage": "tune", "precision": "fp32"}  # bf16 autocast (CUDA's auto) rounds each half-batch
    run(tiny_config(data, tmp_path / "one", **exact), log=quiet)
    run(tiny_config(data, tmp_path / "two", **exact, **{"optim.accumulate": 2}), log=quiet)
    for key, value in adapter(tmp_path / "one", "tune").items():
        torch.testing.assert_close(adapter(tmp_path / "two", "tune")[key], value, rtol=1e-4, atol=1e-5)


def test_ema_is_evaluated_and_saved(data, tmp_path):
    run(tiny_config(data, tmp_path, **{"optim.ema_decay": 0.9, "stage": "tune"}), log=quiet)
    assert all("ema_val_acc" in r for r in metrics(tmp_path, "tune"))
    ema = tmp_path / "seed0" / "tune" / "adapter_ema" / "adapter.safetensors"
    assert ema.is_file()
    assert not torch.equal(adapter(tmp_path, "tune")["prompts"], load_file(ema)["prompts"])


def test_the_ema_starts_from_the_prepared_prompts(data, tmp_path, monkeypatch):
    """SPT's prototypes, not the constructor's xavier draw, are the average's first values."""
    from selfprompt.engine import stage

    seen = {}
    start, ema_class = stage._start, stage.ParameterEMA

    def recording_start(stage_, options, ctx, model, *args):
        start(stage_, options, ctx, model, *args)
        seen["prepared"] = model.prompts.detach().clone()

    def recording_ema(params, decay):
        seen["first_average"] = params["prompts"].detach().clone()
        return ema_class(params, decay)

    monkeypatch.setattr(stage, "_start", recording_start)
    monkeypatch.setattr(stage, "ParameterEMA", recording_ema)
    overrides = {"optim.ema_decay": 0.9, "stage": "tune", "optim.epochs": 1}
    run(tiny_config(data, tmp_path, **overrides), log=quiet)
    assert torch.equal(seen["first_average"], seen["prepared"])


def test_optimizer_groups_and_schedule():
    from conftest import tiny_vit

    model = PromptedViT(tiny_vit(), num_classes=3, num_prompts=2, deep=True)
    groups = {
        g["name"]: (g["weight_decay"], {id(p) for p in g["params"]}) for g in param_groups(model, 0.1, 3.0)
    }
    assert groups["decay"] == (0.1, {id(model.prompts)})
    assert groups["head"] == (3.0, {id(model.head.weight)})
    assert groups["no_decay"] == (0.0, {id(model.head.bias)})
    full = ViTClassifier(tiny_vit(), num_classes=3, train_backbone=True)
    names = {id(p): n for n, p in full.adapter_parameters().items()}
    no_decay = {
        names[id(p)] for g in param_groups(full, 0.1, 3.0) if g["name"] == "no_decay" for p in g["params"]
    }
    assert "backbone.blocks.0.norm1.weight" in no_decay and "backbone.blocks.0.attn.qkv.bias" in no_decay
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total_steps=12, lr=0.5, min_lr=1e-3)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5])
    assert lrs[8] == pytest.approx(1e-3 + (0.5 - 1e-3) * 0.5)  # half-way down the cosine
    assert lrs[12] == pytest.approx(1e-3) and all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def _train_command(cfg_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "selfprompt", "train", *cfg_args]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(data, tmp_path):
    slow = ["--optim.epochs", "8", "--data.batch_size", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_command([*cli_args(data, tmp_path / "whole"), *slow]),
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    command = _train_command([*cli_args(data, tmp_path / "killed"), *slow])
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tune_metrics = tmp_path / "killed" / "seed0" / "tune" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if tune_metrics.is_file() and len(tune_metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "seed0" / "final" / "result.json").exists()
    subprocess.run([*command, "--resume", "true"], env=env, check=True, capture_output=True, timeout=600)
    for stage in ("tune", "final"):
        assert metrics(tmp_path / "killed", stage) == metrics(tmp_path / "whole", stage)
        for key, value in adapter(tmp_path / "whole", stage).items():
            assert torch.equal(adapter(tmp_path / "killed", stage)[key], value), (stage, key)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_command(cli_args(data, tmp_path / "one")),
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "selfprompt", "train", *cli_args(data, tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("tune", "final"):
        for key, value in adapter(tmp_path / "one", stage).items():
            torch.testing.assert_close(adapter(tmp_path / "two", stage)[key], value, rtol=1e-4, atol=1e-5)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one[-1]["test_acc"] == two[-1]["test_acc"]
    assert one[-1]["test_loss"] == pytest.approx(two[-1]["test_loss"], rel=1e-4)
    assert json.loads((tmp_path / "two" / "env.json").read_text())["world_size"] == 2


def test_a_run_saved_before_newer_config_fields_still_resumes():
    defaults = config_dict(TrainConfig())
    saved = copy.deepcopy(defaults)
    del saved["data"]["task"], saved["data"]["normalization"]  # fields an older selfprompt did not write
    assert changed_fields(saved, defaults, defaults) == []
    current = copy.deepcopy(defaults)
    current["data"]["task"] = "dtd"
    assert changed_fields(saved, current, defaults) == ["data.task"]
    del saved["track"]  # a whole section an older selfprompt did not write
    assert changed_fields(saved, defaults, defaults) == []
    tracked = TrainConfig()
    tracked.track.every = 2
    assert changed_fields(saved, config_dict(tracked), defaults) == ["track.every"]
