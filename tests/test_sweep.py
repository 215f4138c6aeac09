"""`selfprompt sweep`: trials on val, the choice and its tie rule, one final test, resumption after a kill,
and two processes sharing one study."""

import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from selfprompt.apps.sweep import (
    SweepSettings,
    _report_done_epochs,
    _study,
    choose,
    grid_order,
    setting_name,
    sweep,
)
from selfprompt.cli import main
from selfprompt.config import TrainConfig
from selfprompt.engine.lifecycle import config_dict

import pytest
import yaml
from engine_helpers import make_dataset, tiny_config

SEARCH = {"optim.lr": [0.02, 0.002], "optim.weight_decay": [0.0, 0.1]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def recipe(data: Path, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    cfg = config_dict(tiny_config(data, tmp_path / "unused", **{"optim.epochs": 3}))
    path.write_text(yaml.safe_dump(cfg))
    return path


def sweep_args(data: Path, tmp_path: Path, out: Path) -> list[str]:
    return ["sweep", str(recipe(data, tmp_path)), "--search", json.dumps(SEARCH), "--output_dir", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> tuple[Path, str]:
    """One sweep of SEARCH, run to its end, and what it printed: one test checks it, another compares."""
    tmp_path = tmp_path_factory.mktemp("whole")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(sweep_args(data, tmp_path, tmp_path / "sweep")) == 0
    return tmp_path / "sweep", printed.getvalue()


def test_ties_go_to_the_first_setting_of_the_search_order():
    order = grid_order(SEARCH)
    assert order[1] == {"optim.lr": 0.02, "optim.weight_decay": 0.1}  # first key slowest
    trials = [
        {"number": 0, "params": order[3], "state": "COMPLETE", "val_acc": 0.5},
        {"number": 1, "params": order[1], "state": "COMPLETE", "val_acc": 0.5},
        {"number": 2, "params": order[0], "state": "COMPLETE", "val_acc": 0.4},
        {"number": 3, "params": order[2], "state": "FAIL", "val_acc": None},
    ]
    assert choose(trials, SEARCH, "grid")["params"] == order[1]
    assert choose(trials, SEARCH, "tpe")["number"] == 0


def test_sweep_records_every_trial_chooses_on_val_and_tests_once(uninterrupted):
    out, printed = uninterrupted
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] and len(record["trials"]) == 4
    assert {setting_name(t["params"]) for t in record["trials"]} == {
        setting_name(p) for p in grid_order(SEARCH)
    }
    best = max(t["val_acc"] for t in record["trials"])
    assert record["best"]["val_acc"] == best
    for trial in record["trials"]:  # tune runs only: no test accuracy anywhere in a trial
        results = json.loads((out / trial["folder"] / "summary.json").read_text())["results"]
        assert [r["stage"] for r in results] == ["tune"] and "last_test_acc" not in results[0]
    final = json.loads((out / "final" / "summary.json").read_text())["results"]
    assert [r["stage"] for r in final] == ["final"]
    assert record["final"]["params"] == record["best"]["params"]
    assert record["final"]["test_acc"] == final[0]["last_test_acc"]
    assert (out / "study.db").is_file()
    assert "final (train+val, tested once)" in printed


@pytest.mark.slow
def test_sweep_png_draws_each_trials_score_and_curve(uninterrupted):
    out, _ = uninterrupted
    record = json.loads((out / "sweep.json").read_text())
    drawn = json.loads((out / "sweep.plot.json").read_text())
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn["scores"] == {setting_name(t["params"]): t["val_acc"] for t in record["trials"]}
    for trial in record["trials"]:
        rows = [json.loads(line) for line in (out / trial["folder"] / "seed0/tune/metrics.jsonl").open()]
        assert drawn["curves"][setting_name(trial["params"])] == [[r["epoch"], r["val_acc"]] for r in rows]


def test_killed_mid_trial_resumes_and_ends_as_an_uninterrupted_sweep(data, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "selfprompt", *sweep_args(data, tmp_path, killed)])
    deadline = time.monotonic() + 120
    while not list(killed.glob("trials/*/seed0/tune/state.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "sweep.json").exists(), "killed before the end"
    assert main(sweep_args(data, tmp_path, killed)) == 0
    a, b = (json.loads((d / "sweep.json").read_text()) for d in (whole, killed))
    assert b["best"]["params"] == a["best"]["params"] and b["best"]["val_acc"] == a["best"]["val_acc"]
    assert b["final"]["test_acc"] == a["final"]["test_acc"]
    scores = {setting_name(t["params"]): t["val_acc"] for t in a["trials"]}
    assert {
        setting_name(t["params"]): t["val_acc"] for t in b["trials"] if t["state"] == "COMPLETE"
    } == scores
    assert len(b["trials"]) == 4 and sum("rerun_of" in t for t in b["trials"]) == 1  # the killed one, once


def ask_trial(out: Path, search: dict, host: str, pid: int):
    """A trial of the study in ``out`` started by a worker ``(host, pid)``: Optuna's own record of it."""
    optuna, study = _study(out, SweepSettings(search), TrainConfig())
    with warnings.catch_warnings():  # a heartbeat is for Study.optimize: this trial has none, never stale
        warnings.simplefilter("ignore")
        trial = study.ask()
    trial.set_user_attr("owner", {"host": host, "pid": pid})
    params = {key: trial.suggest_categorical(key, values) for key, values in search.items()}
    return optuna, trial, params


def test_a_killed_trial_appears_once_as_its_rerun(data, tmp_path, capsys):
    out, search = tmp_path / "sweep", {"optim.lr": [0.02, 0.002]}
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    ask_trial(out, search, socket.gethostname(), int(dead.stdout))  # its worker was killed mid-trial
    args = ["sweep", str(recipe(data, tmp_path)), "--search", json.dumps(search), "--output_dir", str(out)]
    assert main([*args, "--final", "false"]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] and [t["state"] for t in record["trials"]] == ["COMPLETE", "COMPLETE"]
    assert record["trials"][0]["rerun_of"] == [0] and record["trials"][0]["number"] != 0
    assert "best setting" in capsys.readouterr().out


def test_a_worker_that_ends_before_the_others_announces_no_choice(data, tmp_path, capsys):
    out, search = tmp_path / "sweep", {"optim.lr": [0.02, 0.002]}
    out.mkdir()
    optuna, elsewhere, params = ask_trial(out, search, "another-machine", 1)  # still training there
    args = ["sweep", str(recipe(data, tmp_path)), "--search", json.dumps(search), "--output_dir", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "best setting" not in printed and "1 trial(s) still running or queued in other workers" in printed
    assert "the best so far is" in printed and "run this same command again" in printed
    record = json.loads((out / "sweep.json").read_text())
    assert not record["complete"] and record["pending"] == 1
    assert "best" not in record and "final" not in record and record["best_so_far"]["params"] != params
    assert not (out / "final").exists()
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    study.tell(elsewhere.number, 0.5)  # the other worker finishes; the command, run again, chooses
    assert main(args) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] and record["pending"] == 0
    assert record["final"]["params"] == record["best"]["params"]
    assert f"best setting {record['best']['params']}" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_share_one_study_without_running_a_trial_twice(data, tmp_path):
    out = tmp_path / "shared"
    args = [sys.executable, "-m", "selfprompt", *sweep_args(data, tmp_path, out), "--final", "false"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "trials").is_dir() and time.monotonic() < deadline:  # the database exists by then
        time.sleep(0.02)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    logs = [w.communicate(timeout=600)[0].decode() for w in (first, second)]
    assert first.returncode == second.returncode == 0, logs
    started = [line for log in logs for line in log.splitlines() if line.startswith("[sweep] trial")]
    assert len(started) == 4, logs
    record = sweep(tiny_config(data, out), SweepSettings(SEARCH, final=False), log=lambda _: None)
    complete = [t for t in record["trials"] if t["state"] == "COMPLETE"]
    assert sorted(setting_name(t["params"]) for t in complete) == sorted(
        setting_name(p) for p in grid_order(SEARCH)
    )
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in record["trials"])  # a re-issued setting: pruned
    for trial in complete:
        rows = (out / trial["folder"] / "seed0" / "tune" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3, "each setting trained once: one row per epoch"


def test_every_setting_of_the_search_is_checked_before_anything_is_written(data, tmp_path, capsys):
    """The second setting breaks a rule across sections (vfpt's share 1 leaves no prompt for prompt.init
    sample): refused with the method's own sentence, and no folder is made."""
    out = tmp_path / "sweep"
    args = ["sweep", str(recipe(data, tmp_path)), "--search", json.dumps({"vfpt.fourier_share": [0.5, 1.0]})]
    args += ["--output_dir", str(out), "--model.method", "vfpt", "--prompt.init", "sample"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "every prompt is a Fourier prompt" in err and "Traceback" not in err, err
    assert not out.exists()


PRUNED_SEARCH = {"optim.lr": [0.02, 0.01, 0.005, 1e-7]}  # the last one barely moves: the hopeless setting


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_the_pruners_never_judge_a_warmup_epoch(data, tmp_path, pruner):
    """The steps are epochs from 1: with one warmup epoch, epoch 1 is never judged, epoch 2 is."""
    (tmp_path / "s").mkdir()
    base = tiny_config(data, tmp_path / "s")
    assert base.optim.warmup_epochs == 1 and base.optim.epochs == 3
    _, study = _study(tmp_path / "s", SweepSettings(PRUNED_SEARCH, pruner=pruner), base)
    for _ in range(3):  # finished settings that score 1 at every epoch
        trial = study.ask()
        for epoch in (1, 2, 3):
            trial.report(1.0, epoch)
            assert not trial.should_prune()  # as the sweep asks after every report (Hyperband's rungs)
        study.tell(trial, 1.0)
    hopeless = study.ask()
    hopeless.report(0.0, 1)  # the end of the warmup epoch
    assert not hopeless.should_prune()
    hopeless.report(0.0, 2)
    assert hopeless.should_prune()


@pytest.mark.slow
def test_the_median_pruner_stops_the_hopeless_setting_and_never_chooses_it(data, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    base = tiny_config(data, out)
    _, study = _study(out, SweepSettings(PRUNED_SEARCH, pruner="median"), base)
    for lr in PRUNED_SEARCH["optim.lr"]:  # this order: the median has 3 finished trials when it judges 1e-7
        study.enqueue_trial({"optim.lr": lr})
    args = ["sweep", str(recipe(data, tmp_path)), "--search", json.dumps(PRUNED_SEARCH)]
    assert main([*args, "--output_dir", str(out), "--pruner", "median", "--final", "false"]) == 0
    record = json.loads((out / "sweep.json").read_text())
    states = {t["params"]["optim.lr"]: t for t in record["trials"]}
    hopeless = states[1e-7]
    assert record["pruner"] == "median" and record["complete"], record
    assert hopeless["state"] == "PRUNED" and hopeless["pruned_at"]["epoch"] in (2, 3), hopeless  # not warmup
    assert [states[lr]["state"] for lr in PRUNED_SEARCH["optim.lr"][:3]] == ["COMPLETE"] * 3
    assert record["best"]["params"]["optim.lr"] != 1e-7
    assert not (out / hopeless["folder"] / "seed0" / "tune" / "result.json").exists()


def test_a_resumed_trial_reports_the_epochs_its_folder_holds_before_it_goes_on(data, tmp_path):
    from selfprompt.engine.run import run

    folder = tmp_path / "trial"
    cfg = tiny_config(data, folder, **{"stage": "tune", "seeds": [0, 1], "optim.epochs": 2})
    run(cfg, log=lambda _: None)
    _, study = _study(tmp_path, SweepSettings({"optim.lr": [0.02]}, pruner="median"), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    _report_done_epochs(trial, cfg, folder)
    reported = study.trials[-1].intermediate_values
    expected = {}
    for index, seed in enumerate(cfg.seeds):
        for line in (folder / f"seed{seed}" / "tune" / "metrics.jsonl").open():
            row = json.loads(line)
            expected[index * 2 + row["epoch"]] = row["val_acc"]
    assert reported == expected and len(expected) == 4
