"""Cost of the up-front image check: reading headers only against decoding every file in full.

Writes 2,000 32x32 PNGs (VTAB-mini's size), 200 224x224 JPEGs and 100 500x500 JPEGs (FGVC's photos are
about that size; smooth pictures plus noise, quality 90) into a temporary folder, then times, per set of
files, ``--rounds`` times after a warm-up pass (files in the page cache, as on a run's second split):

    header     PIL.Image.open + .size (the check before issue 18: catches neither truncation nor bad data)
    load       PIL.Image.open + .load() (full decode, no conversion)
    load_rgb   selfprompt.data.images.load_rgb (full decode, EXIF orientation, RGB: what training reads)
    unreadable selfprompt.data.images.unreadable on 1, 2 and 4 threads (what load_split and data check use)
    again      unreadable on files it decoded before (the next split listing them: train+val after train)

and prints the medians in ms per set and us per image. About a minute on 2 CPU cores.

    python benchmarks/image_check.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from selfprompt.data import images
from selfprompt.data.images import load_rgb, unreadable

import numpy as np
from PIL import Image


def _write(folder: Path, count: int, size: int, suffix: str, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    paths = []
    for i in range(count):
        phase = rng.random(3)
        smooth = 0.5 + 0.4 * np.sin(6.28 * (ramp[:, None, None] + ramp[None, :, None] * phase + phase))
        pixels = np.clip(smooth * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i}{suffix}"
        Image.fromarray(pixels).save(path, quality=90) if suffix == ".jpg" else Image.fromarray(pixels).save(
            path
        )
        paths.append(path)
    return paths


def _header(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            _ = image.size


def _load(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.load()


def _load_rgb(paths: list[Path]) -> None:
    for path in paths:
        load_rgb(path)


def _uncached(paths: list[Path], threads: int) -> None:
    images._DECODED.clear()  # each round decodes every file
    unreadable(paths, threads=threads)


def _median_ms(call: Callable[[], object], rounds: int) -> float:
    call()  # warm-up: page cache, imports
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPUs available: {cpus}; medians of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "2000 PNG 32x32": _write(Path(tmp) / "png", 2000, 32, ".png", 0),
            "200 JPEG 224x224": _write(Path(tmp) / "jpg", 200, 224, ".jpg", 1),
            "100 JPEG 500x500": _write(Path(tmp) / "big", 100, 500, ".jpg", 2),
        }
        methods: dict[str, Callable[[list[Path]], object]] = {
            "header": _header,
            "load": _load,
            "load_rgb": _load_rgb,
            **{f"unreadable x{n}": (lambda paths, n=n: _uncached(paths, n)) for n in (1, 2, 4)},
            "again (cached)": lambda paths: unreadable(paths),
        }
        print(f"{'':16}" + "".join(f"{name:>26}" for name in sets))
        for method, call in methods.items():
            cells = []
            for paths in sets.values():
                ms = _median_ms(lambda paths=paths, call=call: call(paths), args.rounds)
                cells.append(f"{ms:9.1f} ms {1000 * ms / len(paths):7.1f} us/img")
            print(f"{method:16}" + "".join(f"{cell:>26}" for cell in cells))


if __name__ == "__main__":
    main()
