"""Full fine-tuning: every backbone parameter trains with the new head (``model.drop_path`` acts here
only)."""

from __future__ import annotations

from selfprompt.methods.registry import Search, register_method
from selfprompt.model import ViTClassifier


def _build(backbone, num_classes, settings, **common) -> ViTClassifier:
    return ViTClassifier(backbone, num_classes, train_backbone=True, **common)


register_method(
    "full",
    "everything trains",
    ViTClassifier,
    _build,
    order=1,
    search=Search(
        {"optim.lr": [1e-3, 5e-4, 1e-4], "optim.weight_decay": [5e-2, 1e-4]},
        "ours: AdamW fine-tuning rates a decade below the prompts' (every weight trains)",
    ),
)
