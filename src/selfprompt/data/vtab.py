"""VTAB-1k: the 19 tasks, VTAB's exact split definitions, and a writer of the widely shared extracted layout.

Layout (one folder per task, as the copies shared by VPT/NOAH users): ``<root>/<folder>/`` with images and
the list files ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt`` of
``relative/path label`` lines; ``selfprompt train`` reads it with ``data.layout list``. Nothing here imports
TensorFlow except :class:`TfdsSource`, which only ``selfprompt data prepare vtab-1k`` uses.

The splits follow google-research/task_adaptation (``task_adaptation/data/*.py``): ``train800`` is the first
800 examples of the task's training source, ``val200`` the first 200 of its validation source (a TFDS split,
or the part of ``train`` VTAB holds out by percentage), ``test`` VTAB's test split. Known ambiguities:

- SVHN: VTAB uses ``svhn_cropped`` without the ``extra`` split; val200 starts at 90% of ``train`` (index
  65,931), and test is the full 26,032-image test split.
- dSprites has only a ``train`` split: VTAB takes train 80% / val 10% / test 10% by index, so val200 starts at
  589,824 and test is the last 73,728 images; labels are the 32 x-positions or 40 orientations floored into
  16 bins, and images are the 0/1 masks scaled to 0/255 in 3 channels.
- smallNORB: val200 is the *first* 200 images of the official ``test`` split and test its second half
  (``test[50%:]``, 12,150 images), so validation and test come from the same five test objects per class.
- Which examples land in train800 depends on TFDS's example order, i.e. on the TFDS version of each builder
  (VTAB pins major versions, and KITTI ``3.1.0`` exactly): two copies made with different versions can hold
  different images with the same counts. The manifest records every builder's version.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selfprompt.data.manifest import publish_task
from selfprompt.data.registry import Benchmark, PrepareOptions, TaskInfo, register_benchmark

import numpy as np
from PIL import Image

NAME = "vtab-1k"
SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("natural", "specialized", "structured")
TRAIN, VAL = 800, 200

Example = dict[str, Any]
Slice = tuple[str, int, int]  # (TFDS split, start, stop)


@dataclass(frozen=True)
class SplitRule:
    """How VTAB builds train800 / val200 / test from a TFDS builder's splits.

    ``val_split`` is the TFDS split val200 comes from; with ``val_at_percent`` it starts at that percentage of
    the split (VTAB's held-out part of ``train``), else at 0. ``test_split`` is read whole, or from
    ``test_from_percent`` of it, or (``val_percent``: VTAB's val of that share of ``train``) from the end of
    that val onwards.
    """

    val_split: str = "validation"
    val_at_percent: int | None = None
    test_split: str = "test"
    test_from_percent: int | None = None
    val_percent: int | None = None


@dataclass(frozen=True)
class VTABTask:
    name: str
    folder: str  # the task's folder in the shared extracted copies
    group: str
    num_classes: int
    labels: str  # what a label means
    tfds: str  # builder name and version, as VTAB loads it
    rule: SplitRule
    test_count: int  # VTAB's test split size for the TFDS versions VTAB used
    label: Callable[[Example], int]
    image: Callable[[Example], np.ndarray]


def _label(example: Example) -> int:
    return int(example["label"])


def _rgb(example: Example) -> np.ndarray:
    image = np.asarray(example["image"])
    return np.repeat(image, 3, axis=-1) if image.ndim == 3 and image.shape[-1] == 1 else image


def _mask(example: Example) -> np.ndarray:
    """dSprites' 0/1 masks as 0/255 RGB (VTAB's preprocessing)."""
    return (_rgb(example) * 255).astype(np.uint8)


def _bin(thresholds: list[float], value: float) -> int:
    """VTAB's binning: the index of the last threshold below ``value``."""
    return int(np.nonzero(np.asarray(thresholds) < value)[0].max())


def _clevr_count(example: Example) -> int:
    return len(example["objects"]["size"]) - 3


def _clevr_distance(example: Example) -> int:
    return _bin(
        [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], float(np.min(example["objects"]["pixel_coords"][:, 2]))
    )


def _kitti_vehicle_distance(example: Example) -> int:
    objects = example["objects"]
    depths = np.asarray(objects["location"])[np.asarray(objects["type"]) < 3, 2]  # car, van, truck
    return _bin([-100.0, 8.0, 20.0, 999.0], float(np.min(np.append(depths, 1000.0))))


def _dsprites(attribute: str, values: int) -> Callable[[Example], int]:
    def label(example: Example) -> int:
        return int(np.floor(float(example[attribute]) / (values / 16)))

    return label


def _attribute(attribute: str) -> Callable[[Example], int]:
    return lambda example: int(example[attribute])


_CARVE_90 = SplitRule(val_split="train", val_at_percent=90)
_CARVE_80 = SplitRule(val_split="train", val_at_percent=80)
_CLEVR = SplitRule(val_split="train", val_at_percent=90, test_split="validation")
_DSPRITES = SplitRule(val_split="train", val_at_percent=80, test_split="train", val_percent=10)
_SMALLNORB = SplitRule(val_split="test", test_from_percent=50)
_SIX_TWO_TWO = SplitRule(val_split="train", val_at_percent=60, test_split="train", val_percent=20)
_OFFICIAL = SplitRule()

TASKS: dict[str, VTABTask] = {
    t.name: t
    for t in (
        VTABTask("cifar100", "cifar", "natural", 100, "object category", "cifar100:3.*.*", _CARVE_90, 10000,
                 _label, _rgb),
        VTABTask("caltech101", "caltech101", "natural", 102, "object category (101 and background)",
                 "caltech101:3.*.*", _CARVE_90, 6084, _label, _rgb),
        VTABTask("dtd", "dtd", "natural", 47, "texture", "dtd:3.*.*", _OFFICIAL, 1880, _label, _rgb),
        VTABTask("oxford_flowers102", "oxford_flowers102", "natural", 102, "flower species",
                 "oxford_flowers102:2.*.*", _OFFICIAL, 6149, _label, _rgb),
        VTABTask("oxford_iiit_pet", "oxford_iiit_pet", "natural", 37, "cat or dog breed",
                 "oxford_iiit_pet:3.*.*", _CARVE_80, 3669, _label, _rgb),
        VTABTask("svhn", "svhn", "natural", 10, "house-number digit", "svhn_cropped:3.*.*", _CARVE_90, 26032,
                 _label, _rgb),
        VTABTask("sun397", "sun397", "natural", 397, "scene category", "sun397/tfds:4.*.*", _OFFICIAL, 21750,
                 _label, _rgb),
        VTABTask("patch_camelyon", "patch_camelyon", "specialized", 2, "metastatic tissue in the centre",
                 "patch_camelyon:2.*.*", _OFFICIAL, 32768, _label, _rgb),
        VTABTask("eurosat", "eurosat", "specialized", 10, "land use (Sentinel-2 RGB)", "eurosat/rgb:2.*.*",
                 _SIX_TWO_TWO, 5400, _label, _rgb),
        VTABTask("resisc45", "resisc45", "specialized", 45, "remote-sensing scene", "resisc45:3.*.*",
                 _SIX_TWO_TWO, 6300, _label, _rgb),
        VTABTask("diabetic_retinopathy", "diabetic_retinopathy", "specialized", 5, "retinopathy grade 0-4",
                 "diabetic_retinopathy_detection/btgraham-300:3.*.*", _OFFICIAL, 42670, _label, _rgb),
        VTABTask("clevr_count", "clevr_count", "structured", 8, "number of objects - 3", "clevr:3.*.*",
                 _CLEVR, 15000, _clevr_count, _rgb),
        VTABTask("clevr_dist", "clevr_dist", "structured", 6, "depth of the closest object, 6 bins",
                 "clevr:3.*.*", _CLEVR, 15000, _clevr_distance, _rgb),
        VTABTask("dmlab", "dmlab", "structured", 6, "distance and reward of the object, 6 classes",
                 "dmlab:2.0.1", _OFFICIAL, 22735, _label, _rgb),
        VTABTask("kitti", "kitti", "structured", 4, "depth of the closest vehicle, 4 bins", "kitti:3.1.0",
                 _OFFICIAL, 711, _kitti_vehicle_distance, _rgb),
        VTABTask("dsprites_loc", "dsprites_loc", "structured", 16, "x position, 16 bins", "dsprites:2.*.*",
                 _DSPRITES, 73728, _dsprites("label_x_position", 32), _mask),
        VTABTask("dsprites_ori", "dsprites_ori", "structured", 16, "orientation, 16 bins", "dsprites:2.*.*",
                 _DSPRITES, 73728, _dsprites("label_orientation", 40), _mask),
        VTABTask("smallnorb_azi", "smallnorb_azi", "structured", 18, "camera azimuth, 18 values",
                 "smallnorb:2.*.*", _SMALLNORB, 12150, _attribute("label_azimuth"), _rgb),
        VTABTask("smallnorb_ele", "smallnorb_ele", "structured", 9, "camera elevation, 9 values",
                 "smallnorb:2.*.*", _SMALLNORB, 12150, _attribute("label_elevation"), _rgb),
    )
}  # fmt: skip


def expected_counts(task: VTABTask) -> dict[str, int]:
    return {"train800": TRAIN, "val200": VAL, "train800val200": TRAIN + VAL, "test": task.test_count}


def split_slices(task: VTABTask, sizes: dict[str, int]) -> dict[str, list[Slice]]:
    """The TFDS index ranges of each VTAB-1k split, given the sizes of the builder's TFDS splits.

    Percentages are taken as VTAB does: ``percent * size // 100`` for held-out parts of ``train``, and
    TFDS's ``split[p%:]`` boundary ``round(p * size / 100)`` for smallNORB's test half.
    """
    rule = task.rule
    missing = {"train", rule.val_split, rule.test_split} - set(sizes)
    if missing:
        raise ValueError(
            f"{task.name}: the source lacks the TFDS split(s) {sorted(missing)} that VTAB reads."
        )
    val_start = 0 if rule.val_at_percent is None else rule.val_at_percent * sizes[rule.val_split] // 100
    if rule.val_percent is not None:  # train and val shares, each floored on its own as VTAB does
        test_start = val_start + rule.val_percent * sizes[rule.val_split] // 100
    elif rule.test_from_percent is not None:
        test_start = round(rule.test_from_percent * sizes[rule.test_split] / 100)
    else:
        test_start = 0
    train = [("train", 0, TRAIN)]
    val = [(rule.val_split, val_start, val_start + VAL)]
    slices = {
        "train800": train,
        "val200": val,
        "train800val200": train + val,
        "test": [(rule.test_split, test_start, sizes[rule.test_split])],
    }
    for split, ranges in slices.items():
        for source, start, stop in ranges:
            if stop > sizes[source] or start >= stop:
                raise ValueError(
                    f"{task.name}: {split} needs {source}[{start}:{stop}] but the source's {source} split "
                    f"has {sizes[source]} examples; is this the TFDS builder VTAB uses ({task.tfds})?"
                )
    return slices


class Source(Protocol):
    """Where examples come from: TFDS (:class:`TfdsSource`) or, in tests, a fake with the same shape."""

    def sizes(self) -> dict[str, int]: ...

    def examples(self, split: str, start: int, stop: int) -> Iterable[Example]: ...

    def version(self) -> str: ...


class TfdsSource:
    """A TFDS builder (downloaded and prepared into ``data_dir`` on first use) as a :class:`Source`."""

    def __init__(self, name: str, data_dir: str | None = None) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise ModuleNotFoundError(
                "selfprompt data prepare vtab-1k reads the tasks through TensorFlow Datasets: "
                "pip install 'selfprompt[tfds]' (tensorflow-datasets and tensorflow, for this command only)."
            ) from error
        self._tfds = tfds
        self.builder = tfds.builder(name, data_dir=data_dir)
        self.builder.download_and_prepare()

    def sizes(self) -> dict[str, int]:
        return {name: split.num_examples for name, split in self.builder.info.splits.items()}

    def examples(self, split: str, start: int, stop: int) -> Iterator[Example]:
        dataset = self.builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False)
        yield from self._tfds.as_numpy(dataset)

    def version(self) -> str:
        return f"{self.builder.name}:{self.builder.version}"


def write_task(task: VTABTask, source: Source, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write ``task`` from ``source`` into ``root/<folder>`` (replacing it): PNG images, the four list files,
    ``classes.txt`` and a manifest with counts, class counts, the source's version and per-split SHA-256."""
    slices = split_slices(task, source.sizes())
    final = Path(root) / task.folder
    staging = Path(root) / f".{task.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    lists: dict[str, list[tuple[str, int]]] = {}
    for split in ("train800", "val200", "test"):
        (staging / "images" / split).mkdir(parents=True)
        lists[split] = []
        for source_split, start, stop in slices[split]:
            for offset, example in enumerate(source.examples(source_split, start, stop)):
                label = task.label(example)
                if not 0 <= label < task.num_classes:
                    raise ValueError(
                        f"{task.name}: {source_split}[{start + offset}] has label {label}, outside "
                        f"0..{task.num_classes - 1}; is this the TFDS builder VTAB uses ({task.tfds})?"
                    )
                relative = f"images/{split}/{len(lists[split]):06d}.png"
                Image.fromarray(task.image(example)).save(staging / relative, optimize=False)
                lists[split].append((relative, label))
        log(f"{task.name}: {split} {len(lists[split])} images")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    (staging / "classes.txt").write_text("".join(f"{k}\n" for k in range(task.num_classes)))
    manifest = {"benchmark": NAME, "task": task.name, "source": source.version(), "slices": slices}
    ordered = {split: lists[split] for split in SPLITS}
    publish_task(staging, final, ordered, task.num_classes, manifest)
    return final


def prepare(
    root: str | Path,
    tasks: list[str] | None = None,
    data_dir: str | None = None,
    source: Callable[[VTABTask], Source] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write ``tasks`` (default: all 19) under ``root`` from TFDS (or from ``source(task)``)."""
    unknown = sorted(set(tasks or []) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown VTAB-1k tasks {unknown}; tasks: {list(TASKS)}.")
    make_source = source or (lambda task: TfdsSource(task.tfds, data_dir))
    Path(root).mkdir(parents=True, exist_ok=True)
    return [write_task(TASKS[name], make_source(TASKS[name]), root, log) for name in tasks or TASKS]


def _prepare(options: PrepareOptions, log: Callable[[str], None]) -> None:
    if options.root is None:
        raise ValueError(f"{NAME} needs --root DIR, the folder to write.")
    for folder in prepare(options.root, options.tasks, options.data_dir, log=log):
        log(f"Wrote {folder}")


def _rebuild(folder: Path, info: TaskInfo) -> str:
    return f"rebuild it: selfprompt data prepare {NAME} --root {folder.parent} --tasks {info.name}"


def _tasks() -> dict[str, TaskInfo]:
    return {
        t.name: TaskInfo(t.name, NAME, t.group, t.num_classes, t.labels, t.folder, SPLITS,
                         counts=expected_counts(t), source=f"TFDS {t.tfds}")
        for t in TASKS.values()
    }  # fmt: skip


BENCHMARK = register_benchmark(
    Benchmark(
        NAME, "VTAB-1k", GROUPS, SPLITS, _tasks, _prepare, ("root", "tasks", "data_dir"), _rebuild,
        recipes="recipes/vtab", recipe_backbones=("mae", "moco", "sup_in21k"), order=0,
    )
)  # fmt: skip
