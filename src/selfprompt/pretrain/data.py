"""Pretraining images: Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist), or a folder."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfprompt.data import ImageDataset, load_split
from selfprompt.pretrain.config import PretrainDataConfig

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"
]  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


class ArrayDataset(Dataset):
    """Images held in memory as ``uint8`` arrays ``(N, H, W)`` (gray) or ``(N, H, W, 3)``, served as RGB."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform: Callable | None = None
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise ValueError(
                f"ArrayDataset needs uint8 images (N, H, W[, 3]) and N labels, got {images.dtype} "
                f"{images.shape} and {len(labels)} labels."
            )
        self.images, self.labels, self.classes, self.transform = images, labels, list(classes), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])

    def fingerprint(self) -> str:
        """SHA-256 of the pixels and the labels."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()


def read_idx(path: Path, offset: int) -> np.ndarray:
    """The payload of a gzipped IDX file (16-byte header for images, 8 for labels)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(root: str | Path | None, split: str) -> ArrayDataset:
    """Fashion-MNIST's ``train`` (60,000) or ``test`` (10,000) images, 28x28 gray, 10 classes."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = _FASHION_MNIST_FILES[split]
    images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_file.is_file() and labels_file.is_file()):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {folder} (no {images_file.name} / {labels_file.name}). Install it with "
            f"`apt-get install dataset-fashion-mnist`, or pass --data.root DIR holding the .gz IDX files."
        )
    images = read_idx(images_file, 16).reshape(-1, 28, 28)
    labels = read_idx(labels_file, 8).astype(np.int64)
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES)


def _first(dataset: ArrayDataset | ImageDataset, count: int | None) -> ArrayDataset | ImageDataset:
    if count is None or count >= len(dataset):
        return dataset
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[:count], dataset.labels[:count], dataset.classes)
    return ImageDataset(dataset.samples[:count], dataset.classes, dataset.root)


def pretrain_datasets(
    cfg: PretrainDataConfig, train_transform: Callable, eval_transform: Callable
) -> tuple[ArrayDataset | ImageDataset, ArrayDataset | ImageDataset | None]:
    """The training images (first ``max_images``) and the evaluation images, if any, transformed."""
    if cfg.source == "fashion-mnist":
        train, evaluation = fashion_mnist(cfg.root, "train"), fashion_mnist(cfg.root, "test")
    else:
        if cfg.root is None:
            raise ValueError("data.source folder needs --data.root DIR (DIR/<split>/<class>/<image>).")
        train = load_split(cfg.root, "folder", cfg.train_split)
        evaluation = None
        if cfg.eval_split is not None:
            evaluation = load_split(cfg.root, "folder", cfg.eval_split, classes=train.classes)
    train = _first(train, cfg.max_images)
    train.transform = train_transform
    if evaluation is not None:
        evaluation.transform = eval_transform
    return train, evaluation
