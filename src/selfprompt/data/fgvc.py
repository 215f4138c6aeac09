"""The five FGVC datasets of VPT and SPT, read from their official archives (or VPT's JSON split files)
and written as the list layout selfprompt trains on.

``prepare(name, source)`` reads the extracted archive in ``source`` and writes ``source/selfprompt_splits/``
(or the ``out`` folder given) with ``train.txt``, ``val.txt``, ``trainval.txt``, ``test.txt`` (one
``relative/path label`` line per image, paths relative to that folder), ``classes.txt`` and
``fgvc_split.json``; train on it with ``data.layout list`` and ``data.root`` set to the returned folder (or
``--data.root ROOT --data.benchmark fgvc --data.task NAME`` with the archive in ``ROOT/ROOT_FOLDERS[NAME]``).
The lists live in their own folder because CUB's and NABirds' archives already hold a ``classes.txt`` of
their own (``id name`` lines) that the readers need. Nothing here imports TensorFlow; the ``.mat`` files of
Flowers, Dogs and Cars need scipy
(``pip install 'selfprompt[fgvc]'``), imported only when such a file is read.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfprompt.atomic import atomic_write
from selfprompt.data.datasets import stratified_split
from selfprompt.data.registry import Benchmark, PrepareOptions, TaskInfo, register_benchmark

import numpy as np

NAME = "fgvc"
OUTPUT_DIR = "selfprompt_splits"
# each dataset's folder under an FGVC root (`--data.root ROOT --data.task NAME`), named as VPT's data paths
ROOT_FOLDERS = {
    "cub": "CUB_200_2011",
    "nabirds": "nabirds",
    "flowers": "OxfordFlower",
    "dogs": "Stanford-dogs",
    "cars": "Stanford-cars",
}
SPLIT_FILE = "fgvc_split.json"
LIST_SPLITS = ("train", "val", "trainval", "test")
FORMAT_VERSION = 1
_SHOWN = 3  # offending entries named in one error message

Samples = list[tuple[str, int]]  # (path relative to the dataset folder, 0-based label)


@dataclass(frozen=True)
class SplitSizes:
    """Images per split; ``val`` is None where the split does not exist."""

    train: int
    val: int | None
    test: int


@dataclass(frozen=True)
class FGVCSplits:
    """What a reader returns: class names (index = label) and ``split -> [(relative path, label)]``.

    Paths are relative to the folder the user points at, in POSIX form; ``splits`` holds ``train`` and
    ``test`` and, where the source has one, ``val``.
    """

    classes: list[str]
    splits: dict[str, Samples]


@dataclass(frozen=True)
class FGVCDataset:
    """One FGVC dataset: what it is, where it comes from, what folder to point at, how to read it.

    Attributes:
        name: Registry name (``cub``, ``nabirds``, ``flowers``, ``dogs``, ``cars``).
        title: The dataset's usual name.
        num_classes: Classes of the full dataset.
        label_meaning: What a label is.
        official: Sizes of the official splits.
        vpt: Sizes of VPT's splits (its ``train.json`` / ``val.json`` / ``test.json``).
        homepage: The official page.
        downloads: The official archive files to fetch and extract.
        terms: Licence or terms of use, as the source states them.
        folder: The folder to pass as ``source``, and what it holds.
        vpt_image_dir: The folder (relative to ``source``) that VPT's JSON paths are relative to.
        read: The official-archive reader, ``source -> FGVCSplits``.
    """

    name: str
    title: str
    num_classes: int
    label_meaning: str
    official: SplitSizes
    vpt: SplitSizes
    homepage: str
    downloads: tuple[str, ...]
    terms: str
    folder: str
    vpt_image_dir: str
    read: Callable[[Path], FGVCSplits]


# ---------------------------------------------------------------------------------------------- helpers


def _need(path: Path, dataset: str, folder: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.name} not found in {path.parent}: point --source at the extracted {dataset} folder "
            f"({folder})."
        )
    return path


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise ModuleNotFoundError(
            f"Reading {path.name} needs scipy: pip install scipy (or pip install 'selfprompt[fgvc]')."
        ) from None
    try:
        return loadmat(path, squeeze_me=True)
    except (MatReadError, ValueError, OSError, TypeError, IndexError) as error:  # garbage: IndexError
        raise ValueError(
            f"Cannot read {path} as a MATLAB file ({error}); download and extract it again."
        ) from error


def _mat_field(mat: dict[str, Any], key: str, path: Path) -> Any:
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(
            f"{path} has no {key!r} entry (it holds {', '.join(keys) or 'nothing'}); it is not the official "
            "file: download and extract it again."
        )
    return mat[key]


def _texts(values: Any) -> list[str]:
    """A MATLAB string or cell array of strings (cells possibly nested), as a flat list of Python strings."""
    out = []
    for value in np.atleast_1d(values).ravel():
        while isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        out.append(str(value))
    return out


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.atleast_1d(values).ravel()]


def _records(values: Any) -> list[Any]:
    """A MATLAB struct array (``loadmat(squeeze_me=True)``) as a list of records."""
    return list(np.atleast_1d(values).ravel())


def _contiguous(labelled: dict[str, Iterable[tuple[str, int]]], names: dict[int, str]) -> FGVCSplits:
    """Map the source's class ids (sorted numerically) to labels 0..K-1 and name them."""
    splits = {split: list(samples) for split, samples in labelled.items()}
    ids = sorted({class_id for samples in splits.values() for _, class_id in samples})
    index = {class_id: label for label, class_id in enumerate(ids)}
    return FGVCSplits(
        classes=[names.get(class_id, str(class_id)) for class_id in ids],
        splits={split: [(path, index[cid]) for path, cid in samples] for split, samples in splits.items()},
    )


# ---------------------------------------------------------------------------------- official readers


def _id_table(path: Path, dataset: str, folder: str) -> dict[str, str]:
    """``<id> <value>`` lines (CUB / NABirds metadata) as ``{id: value}``."""
    table: dict[str, str] = {}
    for number, line in enumerate(_need(path, dataset, folder).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<id> <value>', got {line!r}; restore the file.")
        table[parts[0]] = parts[1].strip()
    return table


def _read_birds(root: Path, dataset: str, folder: str) -> FGVCSplits:
    """CUB-200-2011 and NABirds: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and
    ``classes.txt`` (``<id> <value>`` lines), image paths relative to ``images/``.

    Labels follow the class ids used by the images, sorted numerically (CUB: 1..200; NABirds: 555 leaf ids
    out of the 1,011 in ``classes.txt``, which also lists the hierarchy's inner nodes).
    """
    paths = _id_table(root / "images.txt", dataset, folder)
    labels = _id_table(root / "image_class_labels.txt", dataset, folder)
    is_train = _id_table(root / "train_test_split.txt", dataset, folder)
    names = {int(k): v for k, v in _id_table(root / "classes.txt", dataset, folder).items()}
    lacking = [i for i in paths if i not in labels or i not in is_train]
    if lacking:
        raise ValueError(
            f"{len(lacking)} image ids of {root / 'images.txt'} (e.g. {lacking[0]}) have no class in "
            "image_class_labels.txt or no flag in train_test_split.txt; extract the archive again."
        )
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for image_id, path in paths.items():
        split = {"1": "train", "0": "test"}.get(is_train[image_id])
        if split is None:
            raise ValueError(
                f"train_test_split.txt flags image {image_id} with {is_train[image_id]!r}, not 1 (train) or "
                "0 (test); restore the file."
            )
        splits[split].append((f"images/{path}", int(labels[image_id])))
    return _contiguous(splits, names)


def _read_cub(root: Path) -> FGVCSplits:
    return _read_birds(root, "CUB-200-2011", DATASETS["cub"].folder)


def _read_nabirds(root: Path) -> FGVCSplits:
    return _read_birds(root, "NABirds", DATASETS["nabirds"].folder)


def _read_flowers(root: Path) -> FGVCSplits:
    """Oxford Flowers-102: ``jpg/image_%05d.jpg``, ``imagelabels.mat`` (``labels``, 1-based, one per image)
    and ``setid.mat`` (``trnid`` / ``valid`` / ``tstid``: 1-based image numbers). The archive names no
    classes: class k is named ``str(k)`` (its official 1-based label)."""
    folder = DATASETS["flowers"].folder
    labels_path = _need(root / "imagelabels.mat", "Oxford Flowers-102", folder)
    setid_path = _need(root / "setid.mat", "Oxford Flowers-102", folder)
    labels = _ints(_mat_field(_loadmat(labels_path), "labels", labels_path))
    setid = _loadmat(setid_path)
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        numbers = _ints(_mat_field(setid, key, setid_path))
        bad = [n for n in numbers if not 1 <= n <= len(labels)]
        if bad:
            raise ValueError(
                f"{setid_path} lists image {bad[0]} in {key}, but imagelabels.mat labels {len(labels)} "
                "images; the two files do not belong together: download both again."
            )
        splits[split] = [(f"jpg/image_{n:05d}.jpg", labels[n - 1]) for n in numbers]
    return _contiguous(splits, {})


def _read_dogs(root: Path) -> FGVCSplits:
    """Stanford Dogs: ``Images/<synset>-<breed>/*.jpg`` and ``train_list.mat`` / ``test_list.mat`` (from
    ``lists.tar``, in ``source`` or ``source/lists``; ``file_list`` relative to ``Images/``, ``labels``
    1-based). A class is named after its image folder (e.g. ``n02085620-Chihuahua``)."""
    folder = DATASETS["dogs"].folder
    lists = root / "lists" if (root / "lists" / "train_list.mat").is_file() else root
    splits, names = {}, {}
    for split in ("train", "test"):
        path = _need(lists / f"{split}_list.mat", "Stanford Dogs", folder)
        mat = _loadmat(path)
        files = _texts(_mat_field(mat, "file_list", path))
        labels = _ints(_mat_field(mat, "labels", path))
        if len(files) != len(labels):
            raise ValueError(
                f"{path} lists {len(files)} files but {len(labels)} labels; download lists.tar again."
            )
        for file, label in zip(files, labels, strict=True):
            breed = file.split("/")[0]
            if names.setdefault(label, breed) != breed:
                raise ValueError(
                    f"{path}: label {label} is given to images of {names[label]} and of {breed}; "
                    "download lists.tar again."
                )
        splits[split] = [(f"Images/{file}", label) for file, label in zip(files, labels, strict=True)]
    return _contiguous(splits, names)


def _read_cars(root: Path) -> FGVCSplits:
    """Stanford Cars, in either official layout (class ids 1-based, names from ``class_names``):

    - devkit: ``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat``, ``devkit/cars_meta.mat`` and
      ``cars_test_annos_withlabels.mat`` (the separately released test labels; in ``source`` or
      ``source/devkit``); annotation fields ``fname`` and ``class``.
    - all-in-one: ``car_ims/`` and ``cars_annos.mat`` (fields ``relative_im_path``, ``class``, ``test``;
      plus ``class_names``). VPT's JSON split files name ``car_ims/`` paths.
    """
    folder = DATASETS["cars"].folder
    if (root / "cars_annos.mat").is_file():
        path = root / "cars_annos.mat"
        mat = _loadmat(path)
        splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for record in _records(_mat_field(mat, "annotations", path)):
            split = "test" if int(record["test"]) else "train"
            splits[split].append((_texts(record["relative_im_path"])[0], int(record["class"])))
        names = _texts(_mat_field(mat, "class_names", path))
    else:
        devkit = root / "devkit"
        meta = _need(devkit / "cars_meta.mat", "Stanford Cars", folder)
        names = _texts(_mat_field(_loadmat(meta), "class_names", meta))
        candidates = (root / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat")
        test_labels = next((p for p in candidates if p.is_file()), None)
        if test_labels is None:
            raise FileNotFoundError(
                f"cars_test_annos_withlabels.mat not found in {root} or {devkit}: the devkit's "
                "cars_test_annos.mat has no labels; put the separately released test-label file in "
                f"{root} (or use the all-in-one car_ims/ + cars_annos.mat layout)."
            )
        splits = {}
        for split, path, images in (
            ("train", _need(devkit / "cars_train_annos.mat", "Stanford Cars", folder), "cars_train"),
            ("test", test_labels, "cars_test"),
        ):
            records = _records(_mat_field(_loadmat(path), "annotations", path))
            splits[split] = [(f"{images}/{_texts(r['fname'])[0]}", int(r["class"])) for r in records]
    return _contiguous(splits, dict(enumerate(names, start=1)))


# --------------------------------------------------------------------------------------------- registry

# Official sizes were checked against the dataset pages / TFDS / torchvision (CUB, Flowers, Dogs, Cars) and
# NABirds' 48,562-image total; NABirds' 23,929 / 24,633 split is UNVERIFIED (recalled; it sums to 48,562).
# VPT's sizes are recalled from the VPT paper's dataset table, UNVERIFIED (its JSON files were not
# reachable); each train + val equals the official train size, as VPT's 90/10 split of it must.
DATASETS: dict[str, FGVCDataset] = {
    "cub": FGVCDataset(
        name="cub",
        title="CUB-200-2011",
        num_classes=200,
        label_meaning="bird species",
        official=SplitSizes(5994, None, 5794),
        vpt=SplitSizes(5394, 600, 5794),
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        downloads=("https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)",),
        terms="Images from Flickr; for non-commercial research and education (see the dataset page).",
        folder="CUB_200_2011/ holding images/, images.txt, image_class_labels.txt, train_test_split.txt, "
        "classes.txt",
        vpt_image_dir="images",
        read=_read_cub,
    ),
    "nabirds": FGVCDataset(
        name="nabirds",
        title="NABirds",
        num_classes=555,
        label_meaning="bird species (visual categories: some species split by sex, age or plumage)",
        official=SplitSizes(23929, None, 24633),
        vpt=SplitSizes(21536, 2393, 24633),
        homepage="https://dl.allaboutbirds.org/nabirds",
        downloads=("nabirds.tar.gz (after accepting the terms on the homepage)",),
        terms="Cornell Lab of Ornithology terms of use: non-commercial research; accepted before download.",
        folder="nabirds/ holding images/, images.txt, image_class_labels.txt, train_test_split.txt, "
        "classes.txt",
        vpt_image_dir="images",
        read=_read_nabirds,
    ),
    "flowers": FGVCDataset(
        name="flowers",
        title="Oxford Flowers-102",
        num_classes=102,
        label_meaning="flower species (the archive names no classes: class k is its official label k)",
        official=SplitSizes(1020, 1020, 6149),
        vpt=SplitSizes(1020, 1020, 6149),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        downloads=("102flowers.tgz", "imagelabels.mat", "setid.mat"),
        terms="No licence stated on the page (images collected from the web); cite Nilsback & Zisserman "
        "2008.",
        folder="the folder holding jpg/ (from 102flowers.tgz), imagelabels.mat and setid.mat",
        vpt_image_dir="",
        read=_read_flowers,
    ),
    "dogs": FGVCDataset(
        name="dogs",
        title="Stanford Dogs",
        num_classes=120,
        label_meaning="dog breeds (ImageNet synsets)",
        official=SplitSizes(12000, None, 8580),
        vpt=SplitSizes(10800, 1200, 8580),
        homepage="http://vision.stanford.edu/aditya86/ImageNetDogs/",
        downloads=("images.tar", "lists.tar"),
        terms="Images from ImageNet: ImageNet's terms (non-commercial research and education).",
        folder="the folder holding Images/ (from images.tar) and train_list.mat, test_list.mat (from "
        "lists.tar, there or in lists/)",
        vpt_image_dir="Images",
        read=_read_dogs,
    ),
    "cars": FGVCDataset(
        name="cars",
        title="Stanford Cars",
        num_classes=196,
        label_meaning="car make, model and year",
        official=SplitSizes(8144, None, 8041),
        vpt=SplitSizes(7329, 815, 8041),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        downloads=(
            "car_ims.tgz + cars_annos.mat (all-in-one), or cars_train.tgz, cars_test.tgz, car_devkit.tgz "
            "+ cars_test_annos_withlabels.mat",
        ),
        terms="For non-commercial research (the dataset page; images from the web). UNVERIFIED wording.",
        folder="the folder holding car_ims/ and cars_annos.mat, or cars_train/, cars_test/, devkit/ and "
        "cars_test_annos_withlabels.mat",
        vpt_image_dir="",
        read=_read_cars,
    ),
}


def expected_counts(dataset: FGVCDataset) -> dict[str, int]:
    """Images in ``trainval`` (the official train, plus val for Flowers) and ``test``, whichever val split."""
    return {"trainval": dataset.official.train + (dataset.official.val or 0), "test": dataset.official.test}


def get(name: str) -> FGVCDataset:
    """The registry entry of ``name``, or an error listing the names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown FGVC dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    return DATASETS[name]


def read_official(name: str, source: str | os.PathLike) -> FGVCSplits:
    """Read the extracted official archive of dataset ``name`` in ``source``."""
    dataset = get(name)
    root = _source_dir(source, dataset)
    return dataset.read(root)


def _source_dir(source: str | os.PathLike, dataset: FGVCDataset) -> Path:
    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder: point --source at the extracted {dataset.title} folder "
            f"({dataset.folder})."
        )
    return root


# --------------------------------------------------------------------------------------------- VPT JSON


def read_vpt_json(
    name: str, source: str | os.PathLike, json_dir: str | os.PathLike | None = None
) -> FGVCSplits:
    """VPT's split files ``train.json``, ``val.json``, ``test.json`` (each ``{image path: class id}``).

    The paths are relative to ``source/<vpt_image_dir>`` (``images/`` for CUB and NABirds, ``Images/`` for
    Dogs, ``source`` itself for Flowers and Cars), as VPT's JSON dataset loader joins them. Class ids are
    mapped to labels 0..K-1 in numeric order over all three files (VPT maps each split's own sorted ids, the
    same thing when every class is in every split). Class names come from the official archive when it is
    readable in ``source`` and agrees with the JSON labels, else they are the JSON class ids.

    Args:
        name: The dataset.
        source: The extracted official archive.
        json_dir: The folder holding the JSON files; None looks in ``source``.
    """
    dataset = get(name)
    root = _source_dir(source, dataset)
    folder = Path(json_dir).expanduser().resolve() if json_dir is not None else root
    prefix = f"{dataset.vpt_image_dir}/" if dataset.vpt_image_dir else ""
    labelled = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{split}.json not found in {folder}: put VPT's split files for {dataset.title} (train.json, "
                "val.json, test.json) there, or pass --json_dir DIR."
            )
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); download VPT's split files again."
            ) from None
        if not isinstance(table, dict) or not table:
            raise ValueError(
                f"{path} must be a non-empty {{image path: class id}} object; got {type(table).__name__}."
            )
        samples = []
        for key, value in table.items():
            if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
                raise ValueError(f"{path}: class id {value!r} of {key!r} is not an integer; fix the file.")
            samples.append((prefix + key, int(value)))
        labelled[split] = samples
    splits = _contiguous(labelled, {})
    return FGVCSplits(_named_like_archive(splits, root, dataset), splits.splits)


def _named_like_archive(vpt: FGVCSplits, root: Path, dataset: FGVCDataset) -> list[str]:
    """The archive's class names when the archive is readable and labels each shared image the same way."""
    try:
        official = dataset.read(root)
    except (FileNotFoundError, ModuleNotFoundError):
        return vpt.classes
    archive = {path: label for samples in official.splits.values() for path, label in samples}
    disagree = [
        (path, label, archive[path])
        for samples in vpt.splits.values()
        for path, label in samples
        if path in archive and archive[path] != label
    ]
    if disagree:
        path, label, theirs = disagree[0]
        raise ValueError(
            f"VPT's JSON labels {len(disagree)} images differently from the {dataset.title} archive in "
            f"{root} (e.g. {path}: label {label} vs {theirs}); the JSON files belong to another copy of the "
            "dataset."
        )
    return official.classes if len(official.classes) == len(vpt.classes) else vpt.classes


# ---------------------------------------------------------------------------------------------- prepare


def prepare(
    name: str,
    source: str | os.PathLike,
    *,
    splits: Literal["official", "vpt"] = "official",
    json_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the list layout of dataset ``name`` into ``out`` (default ``source/selfprompt_splits/``) and
    return that folder.

    Writes ``train.txt``, ``val.txt``, ``trainval.txt``, ``test.txt`` (``relative/path label`` lines, paths
    relative to ``out``, e.g. ``../images/...``), ``classes.txt`` and ``fgvc_split.json`` (the split source,
    seed, val_fraction and counts), each atomically; nothing in ``source`` is modified. Same inputs and seed
    give byte-identical files.

    Args:
        name: ``cub``, ``nabirds``, ``flowers``, ``dogs`` or ``cars``.
        source: The extracted official archive (see ``DATASETS[name].folder``).
        splits: ``official``: the archive's train/test, and its val where it has one (Flowers); elsewhere val
            is a seeded, per-class ``val_fraction`` of official train and trainval is all of official train.
            ``vpt``: VPT's train/val/test JSON files; trainval is train + val.
        json_dir: Where VPT's JSON files are (``splits="vpt"``); None looks in ``source``.
        val_fraction: Share of each class of official train held out as val, where the archive has no val.
        seed: Seed of that held-out draw.
        out: The folder to write (created); outside ``source`` for a read-only copy of the dataset.

    Raises:
        FileNotFoundError: A missing archive file, JSON file or listed image (named, with the fix).
        FileExistsError: ``out`` holds list or class files that prepare did not write.
        ValueError: An unknown dataset or ``splits``, a malformed archive file, or an overlap between splits.
        ModuleNotFoundError: scipy missing for a ``.mat`` file.
    """
    dataset = get(name)
    root = _source_dir(source, dataset)
    out = Path(out).expanduser().resolve() if out is not None else root / OUTPUT_DIR
    foreign = [f"{stem}.txt" for stem in (*LIST_SPLITS, "classes") if (out / f"{stem}.txt").is_file()]
    if foreign and not (out / SPLIT_FILE).is_file():
        raise FileExistsError(
            f"{out} already holds {', '.join(foreign)}, not written by prepare (CUB's and NABirds' archives "
            f"ship a classes.txt of their own); write elsewhere (the default is source/{OUTPUT_DIR})."
        )
    if splits == "official":
        read = dataset.read(root)
        if "val" in read.splits:
            train, val, val_source = read.splits["train"], read.splits["val"], "official"
        else:
            train, val = stratified_split(read.splits["train"], val_fraction, seed)
            val_source = "seeded"
    elif splits == "vpt":
        read = read_vpt_json(name, root, json_dir)
        train, val, val_source = read.splits["train"], read.splits["val"], "vpt"
    else:
        raise ValueError(f"Unknown splits {splits!r}; use 'official' or 'vpt'.")
    trainval = read.splits["train"] if val_source == "seeded" else train + val
    lists = {"train": train, "val": val, "trainval": trainval, "test": read.splits["test"]}
    _check_lists(lists, root, dataset)
    if len(read.classes) != dataset.num_classes:
        warnings.warn(
            f"{dataset.title} in {root} has {len(read.classes)} classes, not {dataset.num_classes}: a subset "
            "or a different release; results will not compare with published ones.",
            stacklevel=2,
        )

    out.mkdir(parents=True, exist_ok=True)
    prefix = Path(os.path.relpath(root, out)).as_posix()
    for split, samples in lists.items():
        _write(out / f"{split}.txt", "".join(f"{prefix}/{path} {label}\n" for path, label in samples))
    _write(out / "classes.txt", "".join(f"{cls}\n" for cls in read.classes))
    record = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.name,
        "splits": splits,
        "val": val_source,
        "seed": seed if val_source == "seeded" else None,
        "val_fraction": val_fraction if val_source == "seeded" else None,
        "num_classes": len(read.classes),
        "counts": {split: len(samples) for split, samples in lists.items()},
    }
    _write(out / SPLIT_FILE, json.dumps(record, indent=2) + "\n")
    return out


def _check_lists(lists: dict[str, Samples], root: Path, dataset: FGVCDataset) -> None:
    for split, samples in lists.items():
        if not samples:
            raise ValueError(f"The {split} split of {dataset.title} in {root} is empty; check the archive.")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = {p for p, _ in lists[a]} & {p for p, _ in lists[b]}
        if shared:
            raise ValueError(
                f"{len(shared)} images are in both {a} and {b} (e.g. {min(shared)}); the split files overlap."
            )
    for split, samples in lists.items():
        if any("\n" in path or "\r" in path for path, _ in samples):
            raise ValueError(f"An image path of {split} holds a line break; rename the file.")
    missing = sorted(
        {path for samples in lists.values() for path, _ in samples if not (root / path).is_file()}
    )
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (
            f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} listed images are missing under {root}: {shown}. Extract the image archive of "
            f"{dataset.title} there ({dataset.folder})."
        )


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def _prepare(options: PrepareOptions, log: Callable[[str], None]) -> None:
    if options.task is None or options.source is None:
        raise ValueError(f"{NAME} needs --task NAME and --source DIR (the extracted official archive).")
    written = prepare(
        options.task, options.source, splits=options.splits, json_dir=options.json_dir,
        val_fraction=options.val_fraction, seed=options.seed, out=options.out,
    )  # fmt: skip
    log(f"Wrote the split lists of {options.task} into {written}")


def _rebuild(folder: Path, info: TaskInfo) -> str:
    return f"rebuild its lists: selfprompt data prepare {NAME} --task {info.name} --source {folder.parent}"


def _tasks() -> dict[str, TaskInfo]:
    return {
        d.name: TaskInfo(d.name, NAME, NAME, d.num_classes, d.label_meaning,
                         f"{ROOT_FOLDERS[d.name]}/{OUTPUT_DIR}", LIST_SPLITS, counts=expected_counts(d),
                         source=d.homepage)
        for d in DATASETS.values()
    }  # fmt: skip


BENCHMARK = register_benchmark(
    Benchmark(
        NAME, "FGVC", (NAME,), LIST_SPLITS, _tasks, _prepare,
        ("task", "source", "splits", "json_dir", "val_fraction", "seed", "out"), _rebuild,
        recipes="recipes/fgvc", recipe_backbones=("mae", "moco", "sup_in21k"), order=1,
    )
)  # fmt: skip
