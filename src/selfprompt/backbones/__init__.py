"""Backbones: a timm ViT by name and pretrained tag, or from a weights file in any common layout."""

from selfprompt.backbones.create import FAMILIES, BackboneInfo, backbone_info, create_backbone
from selfprompt.backbones.formats import CONVERTERS, CheckpointError, Converted, convert
from selfprompt.backbones.loading import infer_architecture, load_strict, read_checkpoint

__all__ = [
    "CONVERTERS",
    "FAMILIES",
    "BackboneInfo",
    "CheckpointError",
    "Converted",
    "backbone_info",
    "convert",
    "create_backbone",
    "infer_architecture",
    "load_strict",
    "read_checkpoint",
]
