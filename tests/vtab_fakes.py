"""A TFDS-like source for any VTAB-1k task (no TensorFlow): deterministic tiny images and the raw features
each task's label is computed from, with the real TFDS split sizes."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from pathlib import Path

from selfprompt.data import vtab

import numpy as np

# TFDS split sizes of the builders VTAB reads (TFDS catalog)
TFDS_SIZES = {
    "cifar100": {"train": 50000, "test": 10000},
    "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn": {"train": 73257, "test": 26032},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr_count": {"train": 70000, "validation": 15000, "test": 15000},
    "clevr_dist": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites_loc": {"train": 737280},
    "dsprites_ori": {"train": 737280},
    "smallnorb_azi": {"train": 24300, "test": 24300},
    "smallnorb_ele": {"train": 24300, "test": 24300},
}


class FakeSource:
    """Examples whose label (as VTAB computes it) is ``index % num_classes``, so every class occurs."""

    def __init__(self, task: str, sizes: dict[str, int] | None = None, size: int = 8) -> None:
        self.task = vtab.TASKS[task]
        self._sizes = sizes or TFDS_SIZES[task]
        self.size = size

    def sizes(self) -> dict[str, int]:
        return dict(self._sizes)

    def version(self) -> str:
        return f"fake:{self.task.tfds}"

    def examples(self, split: str, start: int, stop: int) -> Iterator[dict]:
        for index in range(start, stop):
            yield self.example(split, index)

    def example(self, split: str, index: int) -> dict:
        k = index % self.task.num_classes
        rng = np.random.default_rng([zlib.crc32(split.encode()), index])
        name = self.task.name
        if name.startswith(("dsprites", "smallnorb")):
            image = rng.integers(0, 2 if name.startswith("dsprites") else 256, (self.size, self.size, 1))
            example = {"image": image.astype(np.uint8)}
        else:
            example = {"image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)}
        if name == "clevr_count":
            example["objects"] = {"size": np.zeros(k + 3), "pixel_coords": np.ones((k + 3, 3))}
        elif name == "clevr_dist":
            depth = [4.0, 8.2, 8.7, 9.2, 9.7, 20.0][k]
            example["objects"] = {
                "size": np.zeros(2),
                "pixel_coords": np.array([[0, 0, depth], [0, 0, 50.0]]),
            }
        elif name == "kitti":
            depth = [5.0, 10.0, 50.0, None][k]
            types = [0, 4] if depth is not None else [4]  # a car (and a pedestrian), or no vehicle
            location = [[0.0, 0.0, depth], [0.0, 0.0, 1.0]] if depth is not None else [[0.0, 0.0, 1.0]]
            example["objects"] = {"type": np.array(types), "location": np.array(location)}
        elif name == "dsprites_loc":
            example["label_x_position"] = 2 * k + index % 2  # 32 positions -> 16 bins
        elif name == "dsprites_ori":
            example["label_orientation"] = math.ceil(2.5 * k)  # 40 orientations -> 16 bins
        elif name == "smallnorb_azi":
            example["label_azimuth"] = k
        elif name == "smallnorb_ele":
            example["label_elevation"] = k
        else:
            example["label"] = k
        return example


def make_vtab_copy(root: Path, task: str, sizes: dict[str, int] | None = None) -> Path:
    """Write ``task``'s extracted layout under ``root`` from a :class:`FakeSource`; returns its folder."""
    return vtab.write_task(vtab.TASKS[task], FakeSource(task, sizes), root, log=lambda _: None)
