"""Linear probing: the frozen backbone's pooled features into a new linear head, the only part that
trains."""

from __future__ import annotations

from selfprompt.methods.registry import Search, register_method
from selfprompt.model import ViTClassifier


def _build(backbone, num_classes, settings, **common) -> ViTClassifier:
    return ViTClassifier(backbone, num_classes, **common)


register_method(
    "linear",
    "frozen backbone, new linear head",
    ViTClassifier,
    _build,
    order=0,
    shares_backbone=True,
    search=Search(
        {"optim.lr": [5e-2, 1e-2, 5e-3, 1e-3], "optim.head_weight_decay": [0.5, 1e-4]},
        "ours: the prompt methods' rates (only the head trains); head_weight_decay: SPT's MAE wd_head 0.5 "
        "(SPT.md 4) or almost none",
    ),
)
