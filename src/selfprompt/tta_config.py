"""Test-time prompt tuning's settings (:class:`TPTConfig`), apart from the tuner
(:class:`selfprompt.engine.tta.PromptTuner`, which re-exports them) so that the CLI's ``eval`` and
``predict`` parsers read them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TPTConfig:
    """TPT's settings (the paper's ImageNet values: 64 views, 10% kept, one step of AdamW at 5e-3).

    Attributes:
        views: Views per image, the image itself included.
        keep: Share of the views kept, the most confident (lowest entropy) ones; at least one.
        steps: Entropy-minimisation steps on the prompts per image; 0 is plain prediction.
        lr: AdamW's learning rate for those steps.
        min_scale: Smallest area share of a random resized crop.
    """

    views: int = 64
    keep: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    min_scale: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.views, int) and self.views >= 1):
            problems.append(f"views must be an integer >= 1, got {self.views!r}")
        if not 0 < self.keep <= 1:
            problems.append(f"keep must be in (0, 1], got {self.keep!r}")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            problems.append(f"steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if not 0 < self.min_scale <= 1:
            problems.append(f"min_scale must be in (0, 1], got {self.min_scale!r}")
        if problems:
            raise ValueError("TPT settings: " + "; ".join(problems) + ".")
