"""Linear probing: the frozen backbone's pooled features into a new linear head, the only part that
trains."""

from __future__ import annotations

from selfprompt.methods.registry import register_method
from selfprompt.model import ViTClassifier


def _build(backbone, num_classes, settings, **common) -> ViTClassifier:
    return ViTClassifier(backbone, num_classes, **common)


register_method("linear", "frozen backbone, new linear head", ViTClassifier, _build, order=0)
