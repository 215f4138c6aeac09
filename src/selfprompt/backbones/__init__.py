"""Backbones: a timm ViT by name and pretrained tag, or from a weights file in any common layout; and each
backbone family's internals (``vit.py``), looked up by class (:func:`backbone_family`)."""

from selfprompt.backbones.create import FAMILIES, BackboneInfo, backbone_info, create_backbone
from selfprompt.backbones.family import BACKBONE_FAMILIES, BackboneFamily, attention_family, backbone_family
from selfprompt.backbones.formats import CONVERTERS, CheckpointError, Converted, convert
from selfprompt.backbones.loading import infer_architecture, load_strict, read_checkpoint

__all__ = [
    "BACKBONE_FAMILIES",
    "CONVERTERS",
    "FAMILIES",
    "BackboneFamily",
    "BackboneInfo",
    "CheckpointError",
    "Converted",
    "attention_family",
    "backbone_family",
    "backbone_info",
    "convert",
    "create_backbone",
    "infer_architecture",
    "load_strict",
    "read_checkpoint",
]
