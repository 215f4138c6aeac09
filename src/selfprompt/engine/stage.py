"""One stage of the protocol: build, initialise, run the epoch loop, evaluate, checkpoint, resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from selfprompt.adapter import TaskInfo
from selfprompt.config import OptimConfig, RunOptions, TrackConfig
from selfprompt.data.config import DataConfig
from selfprompt.data.splits import Splits
from selfprompt.engine.distributed import Context, broadcast_
from selfprompt.engine.ema import ParameterEMA
from selfprompt.engine.loop import classification_loss, evaluate, peak_memory_mb
from selfprompt.engine.metrics import MetricsLog
from selfprompt.engine.optim import param_groups
from selfprompt.engine.result import EVAL_SPLITS, StageResult
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.setup import TrainingOptions, training_setup
from selfprompt.engine.subspace import GradientSubspace, gradient_subspace
from selfprompt.engine.tracking import PromptTracker, probe_batch
from selfprompt.model import ViTClassifier
from selfprompt.pictures import training_curves

import torch
from torch.utils.data import DataLoader, Dataset

STAGE_NAMES = tuple(EVAL_SPLITS)  # tune, final


@dataclass
class Stage:
    """What one stage trains on and evaluates: tune (train -> val) or final (train+val -> test)."""

    name: str
    train: Dataset
    init: Dataset  # the training images with eval transforms, for SPT prototypes
    eval_name: str
    eval_set: Dataset
    eval_every_epoch: bool
    folder: TrainingDir


def build_stage(name: str, splits: Splits, run: RunDir, seed: int, select_on_test: bool = False) -> Stage:
    """Stage ``tune`` (train on train, evaluate val every epoch) or ``final`` (train on train+val, evaluate
    test once, or every epoch with ``select_on_test``, the unsafe reproduction of the official code)."""
    folder = run.stage(seed, name)
    if name == "tune":
        return Stage(name, splits.train, splits.init_train, EVAL_SPLITS[name], splits.val, True, folder)
    if name == "final":
        eval_name = EVAL_SPLITS[name]
        return Stage(
            name, splits.trainval, splits.init_trainval, eval_name, splits.test, select_on_test, folder
        )
    raise ValueError(f"Unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)} (or both).")


@dataclass(frozen=True)
class StageOptions(TrainingOptions):
    """What one stage reads: the training setup's options plus tracking and the evaluation cadence."""

    track: TrackConfig
    eval_every: int = 1

    @classmethod
    def of(  # type: ignore[override]
        cls, optim: OptimConfig, data: DataConfig, run: RunOptions, track: TrackConfig, eval_every: int
    ) -> StageOptions:
        return cls(optim, data.batch_size, data.eval_batch_size, data.num_workers, run, track, eval_every)


Preparer = Callable[[ViTClassifier, DataLoader, int], None]
#: ``observe(stage, seed, epoch, scores)`` after each evaluated epoch's checkpoint, on the main process; an
#: exception it raises (e.g. Optuna's TrialPruned) ends the run there, the checkpoint kept.
EpochObserver = Callable[[str, int, int, dict[str, Any]], None]


def train_stage(
    stage: Stage,
    options: StageOptions,
    ctx: Context,
    build: Callable[[], ViTClassifier],
    prepare: Preparer | None,
    task: TaskInfo,
    seed: int,
    log: Callable[[str], None],
    observe: EpochObserver | None = None,
) -> StageResult:
    """Train one stage to its end (or resume it) and return its result; writes into ``stage.folder``.

    ``build()`` makes the model (under ``torch.manual_seed(seed)``); ``prepare(model, loader, seed)``, when
    given, initialises it from the training images (prompts) on the main process before the first step.
    """
    folder, opt, label = stage.folder, options.optim, f"{stage.name} seed {seed}"
    if options.run.resume and folder.result.is_file():
        log(f"[{label}] already finished: {folder.result}")
        return folder.read_result()
    torch.manual_seed(seed)
    model = build().to(ctx.device)
    subspace = gradient_subspace(model, opt)
    setup = training_setup(
        model.adapter_parameters(), param_groups(model, opt.weight_decay, opt.head_weight_decay),
        stage.train, options, ctx, seed, folder,
        label=label, log=log, what=f"The {stage.name} training split",
    )  # fmt: skip
    tracker = stage_tracker(stage, options, model, ctx, seed)
    if setup.state is None:
        _start(stage, options, ctx, model, prepare, tracker, seed)
    # the average starts from the prepared values (SPT's prototypes), not the constructor's draw
    ema = ParameterEMA(model.adapter_parameters(), opt.ema_decay) if opt.ema_decay else None
    if setup.state is not None:
        _restore(setup.state, ema, subspace, tracker)
    scores = StageScores(stage, options, ctx, model, ema, setup.state["best"] if setup.state else {})

    def end_epoch(epoch: int) -> None:
        if tracker is not None and tracker.due(epoch):
            tracker.record(epoch)
        setup.save(epoch, best=scores.best, **_checkpoint_extras(ema, subspace, tracker))
        if observe is not None and ctx.is_main and scores.last:
            observe(stage.name, seed, epoch, scores.last)

    loop = setup.loop(model, classification_loss, ema=ema, subspace=subspace)
    epoch_times = loop.run(setup.start_epoch, opt.epochs, scores.evaluate, end_epoch)
    result = scores.result(setup.metrics, epoch_times, seed)
    if ctx.is_main:
        _save(stage, model, ema, task, result, options.run.plots)
        setup.metrics.close()
    return result


def stage_tracker(
    stage: Stage, options: StageOptions, model: ViTClassifier, ctx: Context, seed: int
) -> PromptTracker | None:
    """The stage's prompt tracker (``track.every``), on the main process only."""
    if not (options.track.every and ctx.is_main):
        return None
    probe = probe_batch(stage.init, options.track.probe_images, seed).to(ctx.device)
    return PromptTracker(model, probe, options.track, options.optim.epochs, stage.folder, seed)


def _start(
    stage: Stage,
    options: StageOptions,
    ctx: Context,
    model: ViTClassifier,
    prepare: Preparer | None,
    tracker: PromptTracker | None,
    seed: int,
) -> None:
    """A new start: the method prepares the model from the training images (on the main process, then
    broadcast), the tracker records epoch 0, and each rank seeds its own dropout stream."""
    if prepare is not None:
        if ctx.is_main:  # computed once, then broadcast
            loader = DataLoader(
                stage.init, batch_size=options.eval_batch_size, num_workers=options.num_workers
            )
            prepare(model, loader, seed)
        for param in model.adapter_parameters().values():
            broadcast_(param.data)
    if tracker is not None:
        tracker.log.restore([])
        tracker.record(0)
    torch.manual_seed(seed * 1000 + ctx.rank)


def _checkpoint_extras(
    ema: ParameterEMA | None, subspace: GradientSubspace | None, tracker: PromptTracker | None
) -> dict[str, Any]:
    """What a stage's checkpoint keeps besides the setup's: the EMA, the subspace and the tracked rows."""
    return {
        "ema": ema.state_dict() if ema is not None else None,
        "subspace": subspace.state_dict() if subspace is not None else None,
        "analysis": tracker.log.rows if tracker is not None else None,
    }


def _restore(
    state: dict[str, Any],
    ema: ParameterEMA | None,
    subspace: GradientSubspace | None,
    tracker: PromptTracker | None,
) -> None:
    """A resumed stage: the EMA, the gradient subspace and the tracked rows its checkpoint kept."""
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if subspace is not None:
        subspace.load_state_dict(state["subspace"])
    if tracker is not None:
        tracker.log.restore(state["analysis"])


class StageScores:
    """The stage's evaluations: when they are due, the best epoch so far, and the stage's result."""

    def __init__(
        self,
        stage: Stage,
        options: StageOptions,
        ctx: Context,
        model: ViTClassifier,
        ema: ParameterEMA | None,
        best: dict[str, Any],
    ) -> None:
        self.stage, self.options, self.ctx, self.model, self.ema = stage, options, ctx, model, ema
        self.best = best
        self.last: dict[str, Any] = {}  # the latest epoch's scores, empty when it was not evaluated

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """The metrics row's scores of ``epoch`` (empty when no evaluation is due)."""
        stage, options = self.stage, self.options
        if not (
            epoch == options.optim.epochs or (stage.eval_every_epoch and epoch % options.eval_every == 0)
        ):
            self.last = {}
            return {}
        eval_batch = max(1, options.eval_batch_size // self.ctx.world_size)
        eval_args = (stage.eval_set, self.ctx, eval_batch, options.run.precision, options.num_workers)
        scores = evaluate(self.model, *eval_args)
        row = {f"{stage.eval_name}_{k}": v for k, v in scores.items()}
        if self.ema is not None:
            with self.ema.applied():
                row |= {f"ema_{stage.eval_name}_{k}": v for k, v in evaluate(self.model, *eval_args).items()}
        if scores["acc"] > self.best.get("acc", -1.0):
            self.best = {"acc": scores["acc"], "epoch": epoch}
        self.last = row
        return row

    def result(self, metrics: MetricsLog | None, epoch_times: list[float], seed: int) -> StageResult:
        """The stage's result: its last and best scores, size, speed and memory."""
        name, last = self.stage.eval_name, metrics.rows[-1] if metrics else None
        trainable = self.model.num_adapter_parameters()
        return StageResult(
            stage=self.stage.name,
            seed=seed,
            epochs=self.options.optim.epochs,
            last_acc=last[f"{name}_acc"] if last else None,
            best_acc=self.best.get("acc"),
            best_epoch=self.best.get("epoch"),
            trainable_parameters=trainable,
            trainable_share=trainable / sum(p.numel() for p in self.model.parameters()),
            seconds_per_epoch=sum(epoch_times) / len(epoch_times) if epoch_times else None,
            peak_memory_mb=peak_memory_mb(self.ctx),
            selected_on_test=name == "test" and self.stage.eval_every_epoch,
            last_ema_acc=last[f"ema_{name}_acc"] if self.ema is not None and last else None,
        )


def _save(
    stage: Stage,
    model: ViTClassifier,
    ema: ParameterEMA | None,
    task: TaskInfo,
    result: StageResult,
    plots: bool,
) -> None:
    """The stage's adapter (and its EMA's) with ``task`` and this stage's record (:func:`stage_record`),
    class names, result and (``plots``) its curves."""
    folder = stage.folder
    model.task_info = replace(task, training={**(task.training or {}), **stage_record(stage, result)})
    model.save_pretrained(folder.adapter())
    if ema is not None:
        ema_record = {**model.task_info.training, "accuracy": result.last_ema_acc, "weights": "EMA"}
        model.task_info = replace(model.task_info, training=ema_record)
        with ema.applied():
            model.save_pretrained(folder.adapter(ema=True))
    folder.write_classes(task.labels)
    folder.write_result(result)
    if plots:
        training_curves(folder.read_rows(), folder.curves, title=f"{result.stage} seed {result.seed}")


def stage_record(stage: Stage, result: StageResult) -> dict[str, Any]:
    """What an adapter's model card says of the stage that trained it: the stage, seed and epochs, the data
    trained on and its fingerprint, the split evaluated and its accuracy at the last epoch."""
    return {
        "stage": stage.name,
        "seed": result.seed,
        "epochs": result.epochs,
        "trained_on": "train" if stage.name == "tune" else "train+val",
        "data_fingerprint": stage.train.fingerprint(),
        "evaluated_on": stage.eval_name,
        "accuracy": result.last_acc,
        "selected_on_test": result.selected_on_test,
    }
