"""Full fine-tuning: every backbone parameter trains with the new head (``model.drop_path`` acts here
only)."""

from __future__ import annotations

from selfprompt.methods.registry import register_method
from selfprompt.model import ViTClassifier


def _build(backbone, num_classes, settings, **common) -> ViTClassifier:
    return ViTClassifier(backbone, num_classes, train_backbone=True, **common)


register_method("full", "everything trains", ViTClassifier, _build, order=1)
