"""Training and evaluation under the paper's protocol, single process or under torchrun."""

from selfprompt.engine.loop import EpochLoop, evaluate
from selfprompt.engine.run import run
from selfprompt.engine.rundir import RunDir, TrainingDir
from selfprompt.engine.stage import Stage, build_stage, train_stage

__all__ = ["EpochLoop", "RunDir", "Stage", "TrainingDir", "build_stage", "evaluate", "run", "train_stage"]
