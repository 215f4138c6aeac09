"""Training and evaluation under the paper's protocol, single process or under torchrun."""

from selfprompt.engine.loop import Stage, evaluate, train_stage
from selfprompt.engine.run import run

__all__ = ["Stage", "evaluate", "run", "train_stage"]
