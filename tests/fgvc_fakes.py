"""Tiny fake copies of the five FGVC archives (and of VPT's JSON split files), laid out as the real ones.

``make_fake(name, root)`` writes one dataset under ``root`` and returns the folder to pass as ``source``.
Every class gets ``per_class`` tiny JPEGs of its own colour: Flowers splits them 1 train / 1 val / rest test
(its official shape), the others ``per_class - 2`` train / 2 test. The file names, metadata files and
``.mat`` fields are those of the official archives (see ``selfprompt.data.fgvc``).
"""

from __future__ import annotations

import json
from pathlib import Path

from selfprompt.data.fgvc import ROOT_FOLDERS

import numpy as np
from PIL import Image
from scipy.io import savemat

NABIRDS_INNER = {0: "Birds", 1: "Perching Birds", 22: "Waterfowl"}  # hierarchy nodes no image is labelled


def nabirds_leaf_ids(num_classes: int) -> list[int]:
    """Increasing, non-contiguous class ids, as NABirds' leaf classes are (295, 299, 305, 313, ...)."""
    return [295 + 3 * k + k * k for k in range(num_classes)]


def _jpeg(path: Path, label: int, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((40 * label) % 256, (90 + 25 * index) % 256, (200 - 30 * label) % 256)
    Image.new("RGB", (8, 6), colour).save(path, format="JPEG", quality=90)


def _official_split(index: int, per_class: int) -> str:
    return "train" if index < per_class - 2 else "test"


def _birds(root: Path, num_classes: int, per_class: int, nabirds: bool) -> None:
    if nabirds:
        ids = nabirds_leaf_ids(num_classes)
        names = {**NABIRDS_INNER, **{cid: f"Species {cid} (adult)" for cid in ids}}
    else:
        ids = tuple(range(1, num_classes + 1))
        names = {cid: f"{cid:03d}.Bird_{cid}" for cid in ids}
    images, labels, flags = [], [], []
    for label, cid in enumerate(ids):
        for i in range(per_class):
            image_id = f"{cid:04x}{i:028x}" if nabirds else str(len(images) + 1)
            folder = f"{cid:04d}" if nabirds else names[cid]
            relative = f"{folder}/{'' if nabirds else 'Bird_'}{image_id if nabirds else i}.jpg"
            _jpeg(root / "images" / relative, label, i)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {cid}")
            flags.append(f"{image_id} {int(_official_split(i, per_class) == 'train')}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(flags) + "\n")
    (root / "classes.txt").write_text("".join(f"{cid} {name}\n" for cid, name in sorted(names.items())))


def _flowers(root: Path, num_classes: int, per_class: int) -> None:
    labels, split_ids = [], {"trnid": [], "valid": [], "tstid": []}
    for i in range(per_class):  # interleaved, as the real images are not grouped by class
        for label in range(num_classes):
            number = len(labels) + 1
            labels.append(label + 1)
            _jpeg(root / "jpg" / f"image_{number:05d}.jpg", label, i)
            split_ids["trnid" if i == 0 else "valid" if i == 1 else "tstid"].append(number)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in split_ids.items()})


def _dogs(root: Path, num_classes: int, per_class: int, lists_dir: str) -> None:
    lists = {"train": ([], []), "test": ([], [])}
    for label in range(num_classes):
        breed = f"n0208{label:04d}-Breed_{label}"
        for i in range(per_class):
            relative = f"{breed}/n0208{label:04d}_{i}.jpg"
            _jpeg(root / "Images" / relative, label, i)
            files, labels = lists[_official_split(i, per_class)]
            files.append(relative)
            labels.append(label + 1)
    (root / lists_dir).mkdir(parents=True, exist_ok=True)
    for split, (files, labels) in lists.items():
        cells = np.empty((len(files), 1), dtype=object)
        for row, file in enumerate(files):
            cells[row, 0] = np.array([file], dtype=object)
        savemat(
            root / lists_dir / f"{split}_list.mat",
            {
                "file_list": cells,
                "annotation_list": cells,
                "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1),
            },
        )


def _struct(rows: list[dict]) -> np.ndarray:
    array = np.empty((1, len(rows)), dtype=[(key, object) for key in rows[0]])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row.values())
    return array


def _cars(root: Path, num_classes: int, per_class: int, layout: str) -> None:
    names = np.array([f"Make{c} Model{c} 20{c:02d}" for c in range(num_classes)], dtype=object)
    rows = {"train": [], "test": []}
    for label in range(num_classes):
        for i in range(per_class):
            split = _official_split(i, per_class)
            box = {"bbox_x1": 0, "bbox_y1": 0, "bbox_x2": 7, "bbox_y2": 5}
            if layout == "car_ims":
                number = label * per_class + i + 1
                relative = f"car_ims/{number:06d}.jpg"
                rows[split].append(
                    {"relative_im_path": relative, **box, "class": label + 1, "test": int(split == "test")}
                )
            else:
                number = len(rows[split]) + 1
                relative = f"cars_{split}/{number:05d}.jpg"
                rows[split].append({**box, "class": label + 1, "fname": f"{number:05d}.jpg"})
            _jpeg(root / relative, label, i)
    if layout == "car_ims":
        savemat(
            root / "cars_annos.mat",
            {"annotations": _struct(rows["train"] + rows["test"]), "class_names": names.reshape(1, -1)},
        )
        return
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _struct(rows["train"])})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _struct(rows["test"])})


def make_fake(
    name: str,
    root: Path,
    *,
    num_classes: int = 3,
    per_class: int = 5,
    dogs_lists: str = ".",
    cars_layout: str = "devkit",
) -> Path:
    """Write a fake official archive of FGVC dataset ``name`` under ``root``; return the ``source`` folder.

    Args:
        num_classes: Classes (NABirds: non-contiguous leaf ids, see :func:`nabirds_leaf_ids`).
        per_class: Images per class; at least 4 for a seeded val (2 go to test, Flowers: 1 train, 1 val).
        dogs_lists: Where Dogs' ``*_list.mat`` go, relative to the source (``.`` or ``lists``).
        cars_layout: ``devkit`` (cars_train/, cars_test/, devkit/) or ``car_ims`` (car_ims/ + cars_annos.mat).
    """
    source = Path(root) / ROOT_FOLDERS[name]
    source.mkdir(parents=True, exist_ok=True)
    if name in ("cub", "nabirds"):
        _birds(source, num_classes, per_class, nabirds=name == "nabirds")
    elif name == "flowers":
        _flowers(source, num_classes, per_class)
    elif name == "dogs":
        _dogs(source, num_classes, per_class, dogs_lists)
    else:
        _cars(source, num_classes, per_class, cars_layout)
    return source


def make_vpt_json(
    name: str, source: Path, official: dict[str, list[tuple[str, int]]], out: Path | None = None
) -> Path:
    """Write VPT-style ``train.json`` / ``val.json`` / ``test.json`` for a fake made by :func:`make_fake`.

    ``official`` is the reader's ``splits``: its val where it has one (Flowers), else the last train image of
    each class. Keys are relative to VPT's image folder; values are the source's class ids (NABirds' leaf
    ids, 1-based elsewhere), as VPT's files hold them. Returns the folder written to.
    """
    from selfprompt.data import fgvc

    out = Path(out) if out is not None else source
    out.mkdir(parents=True, exist_ok=True)
    prefix = fgvc.DATASETS[name].vpt_image_dir
    strip = len(prefix) + 1 if prefix else 0
    if "val" in official:
        tables = dict(official)
    else:
        val = set({label: path for path, label in official["train"]}.values())
        tables = {
            "train": [(p, y) for p, y in official["train"] if p not in val],
            "val": [(p, y) for p, y in official["train"] if p in val],
            "test": official["test"],
        }
    for split, samples in tables.items():
        table = {path[strip:]: source_id(name, label) for path, label in samples}
        (out / f"{split}.json").write_text(json.dumps(table))
    return out


def source_id(name: str, label: int) -> int:
    """The archive's class id of 0-based ``label`` in a fake."""
    return nabirds_leaf_ids(label + 1)[label] if name == "nabirds" else label + 1
