"""What one stage of a run returns, and writes as ``result.json`` and into ``summary.json``'s ``results``.

On disk the accuracies are keyed by the split the stage evaluates (``last_val_acc`` for tune,
``last_test_acc`` for final); :class:`StageResult` names them once (``last_acc``, ``best_acc``) and writes and
reads that format unchanged, so run folders of every release read back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

EVAL_SPLITS = {"tune": "val", "final": "test"}  # the split each stage evaluates


@dataclass(frozen=True)
class StageResult:
    """One seed's stage, trained to its end.

    Attributes:
        stage: tune (train -> val) or final (train+val -> test).
        seed: The run's seed.
        epochs: Epochs trained.
        last_acc: Accuracy on the evaluated split after the last epoch.
        best_acc: The best evaluated accuracy over the epochs evaluated.
        best_epoch: The epoch of ``best_acc``.
        trainable_parameters: Parameters the adapter trains.
        trainable_share: Their share of the model's parameters.
        seconds_per_epoch: Mean seconds per epoch run in this process (None: none ran, a resumed stage).
        peak_memory_mb: Peak accelerator memory.
        selected_on_test: The final stage evaluated test every epoch (``unsafe_select_on_test``).
        last_ema_acc: ``last_acc`` with the EMA weights (runs with ``optim.ema_decay``), else None.
    """

    stage: str
    seed: int
    epochs: int
    last_acc: float | None
    best_acc: float | None
    best_epoch: int | None
    trainable_parameters: int
    trainable_share: float
    seconds_per_epoch: float | None
    peak_memory_mb: float
    selected_on_test: bool
    last_ema_acc: float | None = None

    @property
    def eval_split(self) -> str:
        """The split this stage evaluates: val (tune) or test (final)."""
        return EVAL_SPLITS[self.stage]

    @property
    def headline_key(self) -> str:
        """The on-disk name of the number a summary reports (:func:`headline_key`)."""
        return headline_key(self.stage, self.selected_on_test)

    @property
    def headline(self) -> float | None:
        """tune: the best val accuracy; final: the last test accuracy (the best, when selected on test)."""
        return self.best_acc if self.headline_key.startswith("best_") else self.last_acc

    def to_json(self) -> dict[str, Any]:
        """The on-disk record: the fields in the file's order, the accuracies keyed by the evaluated split."""
        split = self.eval_split
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "last_ema_acc":
                if value is not None:
                    record[f"last_ema_{split}_acc"] = value
            elif f.name in ("last_acc", "best_acc"):
                record[f"{f.name[:-4]}_{split}_acc"] = value
            else:
                record[f.name] = value
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StageResult:
        """A record written by :meth:`to_json` (or by any earlier release: the format has not changed)."""
        if record.get("stage") not in EVAL_SPLITS:
            raise ValueError(
                f"A stage result names stage {record.get('stage')!r}, not one of {list(EVAL_SPLITS)}."
            )
        split = EVAL_SPLITS[record["stage"]]
        plain = {f.name: record[f.name] for f in fields(cls) if not f.name.endswith("_acc")}
        return cls(
            **plain,
            last_acc=record[f"last_{split}_acc"],
            best_acc=record[f"best_{split}_acc"],
            last_ema_acc=record.get(f"last_ema_{split}_acc"),
        )


def headline_key(stage: str, selected_on_test: bool = False) -> str:
    """The key of the number a summary reports for ``stage``: ``best_val_acc`` (tune), ``last_test_acc``
    (final), or ``best_test_acc`` for a final stage that selected its epoch on test."""
    if stage == "tune":
        return "best_val_acc"
    return "best_test_acc" if selected_on_test else "last_test_acc"
