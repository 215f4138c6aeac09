"""Datasets on disk, timm-derived transforms and a generated dataset for offline runs."""

from selfprompt.data import fgvc, registry, vtab, vtab_mini
from selfprompt.data.datasets import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    load_split,
    merge,
    split_off,
    stratified_split,
)
from selfprompt.data.synthetic import write_image_folder
from selfprompt.data.transforms import build_transform, data_config

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "build_transform",
    "data_config",
    "fgvc",
    "load_split",
    "merge",
    "registry",
    "split_off",
    "stratified_split",
    "vtab",
    "vtab_mini",
    "write_image_folder",
]
