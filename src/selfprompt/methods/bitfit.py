"""BitFit (Ben Zaken et al., ACL 2022; its ViT form as in VPT's and V-PETL's "bias" baselines): only the
backbone's bias terms and the new head train.

Every backbone parameter whose name ends in ``bias`` trains: attention qkv and projection, MLP, LayerNorm and
patch-embedding biases; LayerNorm weights stay frozen. The forward is the backbone's own, so the model starts
exactly at the linear probe. The backbone stays in eval mode (no dropout or drop-path), as for every other
PETL method here. For ``vit_base_patch16_224`` with 100 classes: 102,912 biases + 76,900 head = 179,812.
"""

from __future__ import annotations

from typing import Any

from selfprompt.methods.registry import Search, register_method
from selfprompt.model import ViTClassifier

from torch import nn


class BitFit(ViTClassifier):
    """A frozen timm ``VisionTransformer`` whose bias terms train, with a new linear head.

    Args: as :class:`~selfprompt.model.ViTClassifier` (``train_backbone`` must stay False).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, **kwargs: Any) -> None:
        if kwargs.get("train_backbone"):
            raise ValueError("BitFit trains the backbone's biases only; train_backbone must be False.")
        super().__init__(backbone, num_classes, **kwargs)
        for param in self.biases().values():
            param.requires_grad_(True)

    def biases(self) -> dict[str, nn.Parameter]:
        return {f"backbone.{k}": p for k, p in self.backbone.named_parameters() if k.endswith("bias")}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: every backbone bias and the head."""
        return {**self.biases(), **super().adapter_parameters()}


def _build(backbone, num_classes, settings, **common) -> BitFit:
    return BitFit(backbone, num_classes, **common)


register_method(
    "bitfit",
    "backbone biases and head train",
    BitFit,
    _build,
    order=10,
    search=Search(
        {"optim.lr": [5e-3, 1e-3, 5e-4]},
        "ours: the adapters' rates (docs/methods.md, LoRA and AdaptFormer); biases take no weight decay",
    ),
)
