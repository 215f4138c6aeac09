"""``selfprompt sweep``: the protocol's hyperparameter search, on Optuna.

Each trial trains the tune stage of a recipe with one setting (train split -> validation split) and scores
it by the validation accuracy of its last epoch, averaged over the run's seeds; the best setting is then
retrained on train+val (the final stage) and tested once. Nothing is selected on test.

- **Engine**: an Optuna study stored in a database (``<output_dir>/study.db``, SQLite, by default), so
  several processes or machines sharing one database work on one study; ``grid`` (the protocol's grid:
  every combination once) or ``tpe`` (``trials`` settings drawn by Optuna's TPE sampler).
- **Ties**: the highest validation accuracy wins; equal accuracies go to the setting that comes first in
  the search's own order (the order of the lists given, first key slowest), or for TPE to the earliest
  trial.
- **Sharing**: each worker takes settings no other has started; a setting another live worker is training is
  left to it (recorded as a pruned trial), so no setting is trained twice.
- **Resuming**: a trial's training folder is named after its setting, so a rerun after a kill resumes the
  half-trained setting from its last epoch; a trial left ``RUNNING`` by a process that died on this machine
  is failed and retried with the same setting (Optuna's ``RetryHeartbeatStaleTrialCallback``), and the
  database's heartbeat does the same for workers on other machines. Finished trials are never run again.
- **Pruning** (``pruner``: ``none``, the default, ``median`` or ``hyperband``, Optuna's pruners): a trial
  reports the validation accuracy of every evaluated tune epoch (step = seed index x epochs + epoch) and
  stops when the pruner says its setting is hopeless; the learning-rate warmup's epochs are never judged
  (median: ``n_warmup_steps``; hyperband: ``min_resource``), and the median pruner waits for 3 finished
  trials. A pruned setting is recorded with the epoch it stopped at and is never chosen. A trial resumed
  after a kill first reports the epochs its folder already holds, so its pruning decisions are those of an
  uninterrupted sweep.
- **Record**: ``sweep.json`` holds every trial (setting, state, score, folder; a killed trial once, as its
  rerun), the choice, the tie rule and the final test accuracy; ``trials/<setting>/`` and ``final/`` are
  ordinary run folders. A worker that ends while trials still run in others writes the best so far, not a
  choice: the last worker to finish (or the same command run again) chooses and runs the final stage.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import itertools
import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfprompt.atomic import write_json
from selfprompt.config import TrainConfig, check_config
from selfprompt.engine.build import method_settings
from selfprompt.engine.run import run
from selfprompt.engine.rundir import RunDir
from selfprompt.pictures import sweep_picture

SAMPLERS = ("grid", "tpe")
PRUNERS = ("none", "median", "hyperband")
MEDIAN_STARTUP_TRIALS = 3  # finished trials before the median pruner judges (Optuna's default is 5)
STUDY_NAME = "sweep"
RECORD_NAME = "sweep.json"  # the search's record, beside its trials
HEARTBEAT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What a sweep searches and how.

    Attributes:
        search: Dotted config field -> the values to try, e.g. ``{"optim.lr": [0.1, 0.01]}``.
        sampler: grid (every combination once) or tpe (Optuna's TPE, ``trials`` draws from the lists).
        trials: tpe: how many settings to try (across every process sharing the study).
        storage: Optuna storage URL; None is a SQLite file ``study.db`` in the output folder.
        final: Retrain the chosen setting on train+val and test it once, when every trial has finished.
        pruner: none, median or hyperband: stop a trial whose validation accuracy the pruner finds hopeless.
    """

    search: dict[str, list[Any]]
    sampler: str = "grid"
    trials: int | None = None
    storage: str | None = None
    final: bool = True
    pruner: str = "none"


def check_search(base: TrainConfig, settings: SweepSettings) -> None:
    """Refuse a search that names unknown fields, has empty lists, or cannot run with its sampler."""
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {settings.sampler!r}.")
    if settings.pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {settings.pruner!r}.")
    if not settings.search:
        raise ValueError("--search is empty; give e.g. '{\"optim.lr\": [0.05, 0.01]}'.")
    for key, values in settings.search.items():
        section, _, name = key.rpartition(".")
        holder = getattr(base, section, None) if section else base
        if holder is None or not hasattr(holder, name) or (section == "" and key in ("output_dir", "stage")):
            raise ValueError(f"--search names {key!r}, which is not a field of the training config.")
        if not isinstance(values, list) or not values:
            raise ValueError(f"--search {key}: give a non-empty list of values, got {values!r}.")
    if settings.sampler == "tpe" and not settings.trials:
        raise ValueError("sampler tpe needs --trials N (how many settings to draw).")


def grid_order(search: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every setting of the grid, in the search's own order (first key slowest)."""
    keys = list(search)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*search.values())]


def setting_name(params: dict[str, Any]) -> str:
    """A folder name for a setting: ``optim.lr=0.05,optim.weight_decay=0.01``."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(params.items())).replace("/", "_")


def with_setting(base: TrainConfig, params: dict[str, Any], stage: str, output_dir: Path) -> TrainConfig:
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    cfg.stage, cfg.output_dir, cfg.resume = stage, str(output_dir), RunDir(output_dir).is_run()
    return cfg


def mean_val_acc(run: RunDir) -> float:
    """The score of a tune run: the last epoch's validation accuracy, averaged over its seeds."""
    accs = [r.last_acc for r in run.read_results() if r.stage == "tune"]
    return sum(accs) / len(accs)


def _pruner(optuna, settings: SweepSettings, base: TrainConfig):
    """Optuna's pruner for ``settings.pruner``; the warmup epochs are never judged: the steps reported are the
    epochs, numbered from 1, so the first judged is ``warmup_epochs + 1`` (Optuna judges a step from
    ``n_warmup_steps`` on, and Hyperband's first rung is ``min_resource``)."""
    first = base.optim.warmup_epochs + 1
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first)
    if settings.pruner == "hyperband":
        steps = base.optim.epochs * len(base.seeds)
        return optuna.pruners.HyperbandPruner(min_resource=min(first, steps), max_resource=steps)
    return optuna.pruners.NopPruner()


def _reporter(optuna, trial, cfg: TrainConfig):
    """The engine's epoch observer of a trial: reports each tune epoch's validation accuracy and raises
    TrialPruned when the pruner says so (recording the epoch in the trial)."""

    def observe(stage: str, seed: int, epoch: int, scores: dict[str, Any]) -> None:
        if stage != "tune" or "val_acc" not in scores:
            return
        trial.report(scores["val_acc"], cfg.seeds.index(seed) * cfg.optim.epochs + epoch)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", {"seed": seed, "epoch": epoch})
            raise optuna.TrialPruned(f"pruned at seed {seed} epoch {epoch}")

    return observe


def _report_done_epochs(trial, cfg: TrainConfig, folder: Path) -> None:
    """A resumed trial's epochs that its folder already holds, reported again (without judging them: the
    killed run went on past them)."""
    run = RunDir(folder)
    for index, seed in enumerate(cfg.seeds):
        stage = run.stage(seed, "tune")
        rows = stage.read_rows() if stage.log_file("metrics", "jsonl").is_file() else []
        for row in rows:
            if "val_acc" in row:
                trial.report(row["val_acc"], index * cfg.optim.epochs + row["epoch"])


def _study(out: Path, settings: SweepSettings, base: TrainConfig):
    import optuna  # the `sweep` extra

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        settings.storage or f"sqlite:///{out / 'study.db'}",
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=3 * HEARTBEAT_SECONDS,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
    )
    if settings.sampler == "grid":
        sampler = optuna.samplers.GridSampler(settings.search, seed=0)
    else:
        sampler = optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        sampler=sampler,
        pruner=_pruner(optuna, settings, base),
        direction="maximize",
        load_if_exists=True,
    )
    _retry_dead_local_trials(optuna, study, storage)
    return optuna, study


def _retry_dead_local_trials(optuna, study, storage) -> None:
    """Fail and re-queue (same setting) the trials that a process on this machine left running when it
    died; the heartbeat does the same, after its grace period, for any machine."""
    host, study_id = socket.gethostname(), storage.get_study_id_from_name(STUDY_NAME)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner", {})
        if owner.get("host") == host and not _alive(owner.get("pid", -1)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, storage.get_trial(trial_id))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(base: TrainConfig, settings: SweepSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run this process's share of the study in ``base.output_dir``, then (once every trial has finished,
    in any worker) the final stage of the chosen setting; returns the record written to ``sweep.json``
    (:func:`_record`)."""
    check_search(base, settings)
    out = Path(base.output_dir)
    keys = list(settings.search)
    for values in itertools.product(*settings.search.values()):  # each setting, before anything is written
        cell = with_setting(base, dict(zip(keys, values, strict=True)), "tune", out)
        check_config(cell)
        method_settings(cell)  # the method's rules across sections (e.g. vfpt's share and prompt.init)
    out.mkdir(parents=True, exist_ok=True)
    optuna, study = _study(out, settings, base)

    def objective(trial) -> float:
        trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid()})
        params = {key: trial.suggest_categorical(key, values) for key, values in settings.search.items()}
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if any(t.number != trial.number and t.params == params for t in running):
            # Optuna's grid re-issues started settings at the end of a shared grid: leave it to its worker
            raise optuna.TrialPruned(f"another worker is training {params}")
        folder = out / "trials" / setting_name(params)
        trial.set_user_attr("folder", str(folder.relative_to(out)))
        log(f"[sweep] trial {trial.number}: {params}")
        cfg = with_setting(base, params, "tune", folder)
        if cfg.resume:
            _report_done_epochs(trial, cfg, folder)
        run(cfg, log=lambda _: None, observe=_reporter(optuna, trial, cfg))
        return mean_val_acc(RunDir(folder))

    if settings.sampler == "grid":
        left = None if not study.sampler.is_exhausted(study) else 0  # optimize would re-run a setting
    else:
        left = max(0, settings.trials - len(_judged(optuna, study)))
    if left != 0:
        study.optimize(objective, n_trials=left)
    record = _record(optuna, study, settings, out)
    if settings.final and record["complete"]:
        record["final"] = _final(base, record["best"]["params"], out, log)
    write_json(out / RECORD_NAME, record)
    _draw(record, out)
    return record


def _draw(record: dict[str, Any], out: Path) -> None:
    """``sweep.png``: each trial's score and the validation accuracy per epoch of its first seed."""
    scores, curves = {}, {}
    for trial in record["trials"]:
        name = setting_name(trial["params"])
        scores[name] = trial["val_acc"] if trial["state"] == "COMPLETE" else None
        run = RunDir(out / trial["folder"]) if trial.get("folder") else None
        seeds = run.read_config().get("seeds", [0]) if run is not None and run.is_run() else []
        stage = run.stage(seeds[0], "tune") if seeds else None
        if stage is not None and stage.log_file("metrics", "jsonl").is_file():
            curves[name] = [[row["epoch"], row["val_acc"]] for row in stage.read_rows() if "val_acc" in row]
    sweep_picture(scores, curves, out / "sweep.png", title=f"sweep of {', '.join(record['search'])}")


def _judged(optuna, study) -> list:
    """The trials that ended with a verdict on their setting: finished, or stopped by the pruner."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if _verdict(t)]


def _verdict(trial) -> bool:
    return trial.state.name == "COMPLETE" or "pruned_at" in trial.user_attrs


def choose(trials: list[dict[str, Any]], search: dict[str, list[Any]], sampler: str) -> dict[str, Any]:
    """The best finished trial by validation accuracy, ties broken by the search's order (grid) or the
    earliest trial (tpe)."""
    order = {setting_name(p): i for i, p in enumerate(grid_order(search))}

    def rank(t: dict[str, Any]) -> tuple:
        tie = order[setting_name(t["params"])] if sampler == "grid" else t["number"]
        return (-t["val_acc"], tie)

    return min((t for t in trials if t["state"] == "COMPLETE"), key=rank)


def _record(optuna, study, settings: SweepSettings, out: Path) -> dict[str, Any]:
    """What ``sweep.json`` holds. A trial killed and rerun appears once, as its rerun (``rerun_of``: the
    killed trials' numbers). The choice is ``best`` once the study is complete; before, ``best_so_far``,
    with ``pending`` trials still running or queued (in other workers)."""
    retries = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
    found = study.get_trials(deepcopy=False)
    superseded = {number for t in found for number in retries(t)}
    trials = [
        {
            "number": t.number,
            "params": t.params,
            "state": t.state.name,
            "val_acc": t.value,
            "folder": t.user_attrs.get("folder"),
            **({"pruned_at": t.user_attrs["pruned_at"]} if "pruned_at" in t.user_attrs else {}),
            **({"rerun_of": retries(t)} if retries(t) else {}),
        }
        for t in found
        if t.number not in superseded
    ]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    judged = done + [t for t in trials if "pruned_at" in t]
    if settings.sampler == "grid":
        finished, wanted = len({setting_name(t["params"]) for t in judged}), len(grid_order(settings.search))
    else:
        finished, wanted = len(judged), settings.trials
    record: dict[str, Any] = {
        "search": settings.search,
        "sampler": settings.sampler,
        "score": "validation accuracy of the last tune epoch, mean over seeds",
        "pruner": settings.pruner,
        "tie_rule": "first in the search's order (first key slowest)"
        if settings.sampler == "grid"
        else "earliest trial",
        "trials": trials,
        "complete": finished >= wanted,
        "pending": sum(t["state"] in ("RUNNING", "WAITING") for t in trials),
    }
    if done:
        key = "best" if record["complete"] else "best_so_far"
        record[key] = choose(trials, settings.search, settings.sampler)
    return record


def _final(base: TrainConfig, params: dict[str, Any], out: Path, log: Callable[[str], None]) -> dict:
    """Retrain the chosen setting on train+val and test it once (one process at a time)."""
    folder = out / "final"
    with open(out / "final.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the resume check below must see another process's final run
        log(f"[sweep] final stage with {params}")
        run(with_setting(base, params, "final", folder), log=lambda _: None)
        results = RunDir(folder).read_results()
    tests = [r.last_acc for r in results if r.stage == "final"]
    return {"params": params, "folder": "final", "test_acc": sum(tests) / len(tests), "per_seed": tests}
