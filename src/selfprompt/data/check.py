"""``selfprompt data check``: a prepared task folder against what selfprompt expects of it.

Per task: every list file of the protocol is there, is UTF-8 and parses (lines well-formed, relative, not
repeated, inside the list's base folder); counts match the registry (VTAB-1k's 800/200/1,000/test sizes,
FGVC's official sizes) or the folder's own manifest; no image is in two of train, val and test; labels lie
in the task's classes and every class occurs; every listed image exists and decodes in full; no image on
disk is left out of every list; and where the folder has a manifest with hashes (written by ``selfprompt
data prepare``), each list and image still hashes the same: a manifest with a hash per file names each
changed, added or removed image and each changed list; an older one, with one hash per split, names the
split only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.data import registry
from selfprompt.data.datasets import IMAGE_EXTENSIONS, BadLine, parse_list
from selfprompt.data.images import unreadable
from selfprompt.data.manifest import MANIFEST_NAME, file_hash, split_hash
from selfprompt.data.registry import TaskInfo, tasks

_SHOWN = 3  # files named per problem


@dataclass(frozen=True)
class Problem:
    kind: str  # list, count, overlap, label, classes, missing, corrupt, extra, modified, added, removed
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail} -> {self.fix}"


def _named(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


def _read_list(path: Path) -> tuple[list[tuple[str, int]], list[BadLine]]:
    """``(relative path, label)`` entries and the lines that cannot be used (:func:`parse_list`).

    Raises:
        ValueError: The file is not UTF-8.
    """
    entries, bad = parse_list(path)
    return [(p, label) for _, p, label in entries], bad


def check_task(folder: str | Path, info: TaskInfo, counts: dict[str, int] | None = None) -> list[Problem]:
    """Every problem of the task folder ``folder`` (an empty list: it is ready to train on).

    ``counts`` overrides the expected images per split (default: the registry's, then the folder manifest's).
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    expected = dict(manifest.get("counts", {})) | info.counts | (counts or {})
    rebuild = _rebuild_hint(folder, info)
    problems: list[Problem] = []
    listed: dict[str, list[tuple[str, int]]] = {}
    for split in info.splits:
        path = folder / f"{split}.txt"
        if not path.is_file():
            problems.append(Problem("list", f"{path.name} is missing", rebuild))
            continue
        try:
            entries, bad = _read_list(path)
        except ValueError as error:  # not UTF-8
            problems.append(Problem("list", str(error), rebuild))
            continue
        for line in bad[:_SHOWN]:
            problems.append(
                Problem("list", f"{path.name}:{line.number}: {line.problem}", f"{line.fix}; {rebuild}")
            )
        if len(bad) > _SHOWN:
            problems.append(Problem("list", f"{path.name} has {len(bad) - _SHOWN} more such lines", rebuild))
        listed[split] = entries
        if split in expected and len(entries) != expected[split]:
            problems.append(
                Problem(
                    "count",
                    f"{path.name} lists {len(entries)} images, {info.name} has {expected[split]}",
                    rebuild,
                )
            )
    problems += _overlaps(listed, info, rebuild)
    labels = {label for entries in listed.values() for _, label in entries}
    outside = sorted(label for label in labels if not 0 <= label < info.num_classes)
    if outside:
        problems.append(
            Problem("label", f"labels {outside[:_SHOWN]} lie outside 0..{info.num_classes - 1}", rebuild)
        )
    absent = sorted(set(range(info.num_classes)) - labels)
    if listed and absent:
        problems.append(
            Problem(
                "classes",
                f"{len(absent)} of the {info.num_classes} classes occur in no split (e.g. {absent[:_SHOWN]})",
                rebuild,
            )
        )
    files = sorted({path for entries in listed.values() for path, _ in entries})
    missing = [p for p in files if not (folder / p).is_file()]
    absent_files = set(missing)
    if missing:
        problems.append(
            Problem("missing", f"{len(missing)} listed images do not exist: {_named(missing)}", rebuild)
        )
    failed = {path for path, _ in unreadable(folder / p for p in files if p not in absent_files)}
    corrupt = [p for p in files if folder / p in failed]
    if corrupt:
        problems.append(
            Problem(
                "corrupt",
                f"{len(corrupt)} images do not decode: {_named(corrupt)}",
                f"replace them; {rebuild}",
            )
        )
    extra = _unlisted_images(folder, files)
    if extra:
        problems.append(
            Problem(
                "extra",
                f"{len(extra)} images are in no split list: {_named(extra)}",
                "remove them, or restore the list lines that named them",
            )
        )
    if "file_sha256" in manifest:
        problems += _changed_files(folder, manifest, list(listed), files, rebuild)
        return problems
    for split, digest in manifest.get("sha256", {}).items():  # an older manifest: one hash per split
        path = folder / f"{split}.txt"
        if split in listed and not missing and split_hash(folder, path.read_text()) != digest:
            problems.append(
                Problem(
                    "modified",
                    f"the {split} list or its images differ from the manifest's SHA-256 (this older manifest "
                    f"holds one hash per split, so it cannot name the file)",
                    f"{rebuild} (its new manifest holds a hash per file)",
                )
            )
    return problems


def _changed_files(
    folder: Path, manifest: dict[str, Any], splits: list[str], files: list[str], rebuild: str
) -> list[Problem]:
    """Against a manifest with a hash per file, the images ``files`` the lists of ``splits`` name: each
    image whose bytes changed, each the manifest does not hold (added), each of the manifest's that is gone
    from every list and from disk (removed; a listed image that is gone is the missing check's, one in no
    list the extra check's), and each list whose lines changed."""
    hashes: dict[str, str] = manifest["file_sha256"]
    on_disk = {p for p in files if (folder / p).is_file()}
    changed = [p for p in files if p in hashes and p in on_disk and file_hash(folder / p) != hashes[p]]
    added = [p for p in files if p not in hashes]
    removed = sorted(p for p in set(hashes) - set(files) if not (folder / p).is_file())
    found = [
        (kind, f"{len(paths)} {what}: {_named(paths)}")
        for kind, what, paths in (
            ("modified", "images differ from the manifest's SHA-256", changed),
            ("added", "listed images are not in the manifest", added),
            ("removed", "images of the manifest are gone from every list and from disk", removed),
        )
        if paths
    ]
    found += [
        ("modified", f"{split}.txt differs from the manifest's (a label, a path or the order changed)")
        for split, digest in manifest.get("list_sha256", {}).items()
        if split in splits and file_hash(folder / f"{split}.txt") != digest
    ]
    return [Problem(kind, detail, rebuild) for kind, detail in found]


def _overlaps(listed: dict[str, list[tuple[str, int]]], info: TaskInfo, rebuild: str) -> list[Problem]:
    """Images that two of the train, val and test lists share (train+val is their union by design)."""
    train, val, _, test = info.splits
    found = []
    for a, b in ((train, val), (train, test), (val, test)):
        if a in listed and b in listed:
            shared = sorted({p for p, _ in listed[a]} & {p for p, _ in listed[b]})
            if shared:
                found.append(
                    Problem(
                        "overlap",
                        f"{len(shared)} images are in both {a}.txt and {b}.txt: {_named(shared)}",
                        f"an image belongs to one split; {rebuild}",
                    )
                )
    return found


def _readable_lists(folder: Path, info: TaskInfo) -> list[str]:
    """The splits of ``info`` whose list file is in ``folder`` and is UTF-8."""
    found = []
    for split in info.splits:
        try:
            if (folder / f"{split}.txt").is_file():
                parse_list(folder / f"{split}.txt")
                found.append(split)
        except ValueError:
            pass
    return found


def _unlisted_images(folder: Path, files: list[str]) -> list[str]:
    """Images under the folder that holds the task folder and every listed image (an FGVC archive's root for
    lists in its ``selfprompt_splits/``) that no list names, as paths relative to the task folder."""
    listed = {os.path.normpath(folder / p) for p in files}
    base = Path(os.path.commonpath([os.path.normpath(folder), *listed]))
    found = []
    for directory, subdirs, names in os.walk(base):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [
            os.path.join(directory, n)
            for n in names
            if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
        ]
    return sorted(Path(os.path.relpath(p, folder)).as_posix() for p in set(found) - listed)


def _rebuild_hint(folder: Path, info: TaskInfo) -> str:
    return registry.benchmark(info.benchmark).check(folder, info)


def check_root(
    root: str | Path, benchmark: str, names: list[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, list[Problem]]:
    """Check the tasks of ``benchmark`` found under ``root`` (or ``names``, which must all be there)."""
    root = Path(root)
    known = tasks(benchmark)
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"Unknown {benchmark} tasks {unknown}; tasks: {list(known)}.")
    wanted = names or [n for n, t in known.items() if (root / t.folder).is_dir()]
    if not wanted:
        folders = [t.folder for t in known.values()]
        raise FileNotFoundError(f"{root} holds no {benchmark} task folder (looked for {folders}).")
    report = {}
    for name in wanted:
        info = known[name]
        folder = root / info.folder
        if not folder.is_dir() and len(wanted) == 1 and (root / f"{info.splits[-1]}.txt").is_file():
            folder = root  # the task folder itself
        if not folder.is_dir():
            report[name] = [Problem("missing", f"{folder} does not exist", _rebuild_hint(folder, info))]
        else:
            report[name] = check_task(folder, info)
        counts = {s: len(parse_list(folder / f"{s}.txt")[0]) for s in _readable_lists(folder, info)}
        log(f"{name}: ok ({counts})" if not report[name] else f"{name}: {len(report[name])} problem(s)")
        for problem in report[name]:
            log(f"  {problem}")
    return report


def verify_prepared(task_dir: str | Path) -> dict[str, Any]:
    """Check a prepared task folder (VTAB-mini's, by default before every run) against its manifest
    (:func:`check_task`); raise naming every problem and the command that rebuilds the task."""
    task_dir = Path(task_dir)
    path = task_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    found = registry.of_manifest(manifest)
    if found is None:
        raise FileNotFoundError(
            f"{task_dir} is not a prepared task of a known benchmark (no {MANIFEST_NAME} naming one of "
            f"{list(registry.names())}); rebuild it with selfprompt data prepare."
        )
    problems = check_task(task_dir, tasks(found.name)[manifest["task"]])
    if problems:
        raise ValueError(f"{found.title} task {task_dir} failed its check: {'; '.join(map(str, problems))}")
    return manifest
