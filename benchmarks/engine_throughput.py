"""Training-engine throughput on this machine: images/s, peak memory and data-loader overhead per method.

Every method trains in a fresh process (``python -m selfprompt train``), so that its peak memory is its own
(the engine's ``peak_memory_mb``: CUDA max allocated, else the process's max RSS), on one generated PNG
dataset (list layout) with a random-weight backbone, stage tune, evaluating only after the last epoch. From
each run's metrics.jsonl and result.json:

1. Throughput: images trained per second of wall time per epoch, median over the epochs after the first
   (warm-up) one; peak memory.
2. Step time: (epoch_time - data_time) / steps per epoch, median over the same epochs, and its ratio to
   ``linear``'s (same backbone, same settings, same number of loader workers, run by the same invocation).
3. Loader overhead: epoch_time / (epoch_time - data_time), where data_time is the time the training loop
   waited for the loader: one epoch's wall time against the sum of its step times. Target within 1.15x
   (judged on the median after warm-up; the warm-up epoch, which starts the workers, is shown beside it).
   Shown for --num-workers on every method and for --compare-workers on --compare-methods. The ratio only
   sees the loop waiting; loader workers that share few cores with the compute threads slow the steps
   instead, which shows in step time and images/s against --compare-workers 0.

Runs whose timings other processes disturbed (more than 10% of the CPUs busy outside the run, from
/proc/stat, hypervisor steal included) are flagged; vpt-X and spt-X train the same model, so their step
times differing shows this machine's run-to-run noise. Takes about 5 minutes on 2 CPU cores.

    python benchmarks/engine_throughput.py [--model vit_tiny_patch16_224] [--img-size 224] [--batch 32]
        [--train-images 192] [--epochs 3] [--num-workers 2] [--compare-workers 0] [--compare-methods linear]
        [--methods linear full vpt-shallow vpt-deep spt-shallow spt-deep] [--extra '--device_data true']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import selfprompt as sp  # before timm (see README)
from selfprompt.data.synthetic import write_image_folder
from selfprompt.methods import get_method, method_names

import timm
import torch

NUM_CLASSES = 10
TARGET = 1.15  # epoch wall time / sum of step times
NOISY = 0.10  # share of the CPUs used by other processes beyond which a run's timings are flagged


def train_command(args: argparse.Namespace, root: Path, out: Path, method: str, workers: int) -> list[str]:
    kwargs = {"img_size": args.img_size, **json.loads(args.backbone_kwargs)}
    return [
        *("-m", "selfprompt", "train"),
        *("--model.backbone", args.model, "--model.pretrained", "false"),
        *("--model.backbone_kwargs", json.dumps(kwargs), "--model.method", method),
        *("--data.root", str(root), "--data.layout", "list"),
        *("--data.train_split", "train", "--data.val_split", "val"),
        *("--data.trainval_split", "trainval", "--data.test_split", "test"),
        *("--data.batch_size", str(args.batch), "--data.num_workers", str(workers)),
        *("--optim.epochs", str(args.epochs), "--optim.warmup_epochs", "1"),
        *("--stage", "tune", "--eval_every", str(args.epochs), "--device", args.device),
        *("--progress", "false", "--output_dir", str(out)),
        *shlex.split(args.extra),
    ]


def busy_cpu_seconds() -> float | None:
    """CPU time spent by every process on the machine so far (Linux /proc/stat), None elsewhere."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_method(args: argparse.Namespace, root: Path, work: Path, method: str, workers: int) -> dict[str, Any]:
    out = work / f"{method}-w{workers}"
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    busy, own, started = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *train_command(args, root, out, method, workers)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - started
    own = children_cpu_seconds() - own  # the run and its loader workers
    busy_after = busy_cpu_seconds()
    others = None if busy is None or busy_after is None else max(0.0, busy_after - busy - own)
    if proc.returncode != 0:
        sys.exit(f"{method} (num_workers {workers}) failed with exit code {proc.returncode}:\n{proc.stderr}")
    stage_dir = out / "seed0" / "tune"
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((stage_dir / "result.json").read_text())
    steps = rows[0]["step"] // rows[0]["epoch"]
    steady = rows[1:]  # after the warm-up epoch

    def overhead(row: dict[str, Any]) -> float:
        return row["epoch_time"] / (row["epoch_time"] - row["data_time"])

    return {
        "method": method,
        "workers": workers,
        "steps": steps,
        "trainable": result["trainable_parameters"],
        "images_per_s": statistics.median(steps * args.batch / r["epoch_time"] for r in steady),
        "step_s": statistics.median((r["epoch_time"] - r["data_time"]) / steps for r in steady),
        "overhead": statistics.median(overhead(r) for r in steady),
        "overhead_warmup": overhead(rows[0]),
        "data_s": statistics.median(r["data_time"] for r in steady),
        "peak_mb": result["peak_memory_mb"],
        "wall_s": wall,
        "cpu_share": own / (wall * (os.cpu_count() or 1)),
        "others_share": None if others is None else others / (wall * (os.cpu_count() or 1)),
        "device": json.loads((out / "env.json").read_text())["device"],
    }


COLUMNS = [  # title, width
    ("method", 12), ("workers", 7), ("trainable", 10), ("img/s", 7), ("step s", 7), ("vs linear", 9),
    ("peak MB", 8), ("wait s", 7), ("epoch/steps", 11), ("1st epoch", 9), ("target", 6), ("run s", 6),
    ("cpu", 5), ("others", 6),
]  # fmt: skip


def table_row(cells: list[str]) -> str:
    """The first cell left-aligned, the others right-aligned, in the widths of COLUMNS."""
    widths = [width for _, width in COLUMNS]
    return " ".join(
        [f"{cells[0]:{widths[0]}s}"] + [f"{c:>{w}s}" for c, w in zip(cells[1:], widths[1:], strict=True)]
    )


def print_table(runs: list[dict[str, Any]]) -> None:
    linear = {r["workers"]: r["step_s"] for r in runs if r["method"] == "linear"}
    header = table_row([title for title, _ in COLUMNS])
    print(header)
    print("-" * len(header))
    for r in runs:
        base = linear.get(r["workers"])
        cells = [
            r["method"],
            str(r["workers"]),
            f"{r['trainable']:,d}",
            f"{r['images_per_s']:.1f}",
            f"{r['step_s']:.3f}",
            f"{r['step_s'] / base:.2f}x" if base else "-",
            f"{r['peak_mb']:.0f}",
            f"{r['data_s']:.2f}",
            f"{r['overhead']:.3f}x",
            f"{r['overhead_warmup']:.3f}x",
            "ok" if r["overhead"] <= TARGET else "MISS",
            f"{r['wall_s']:.1f}",
            f"{100 * r['cpu_share']:.0f}%",
            "-" if r["others_share"] is None else f"{100 * r['others_share']:.0f}%",
        ]
        print(table_row(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224, help="Image side (dataset and backbone).")
    parser.add_argument("--backbone-kwargs", default="{}", help="Extra JSON keyword arguments for timm.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=192, help="Rounded up to a multiple of 10.")
    parser.add_argument("--val-images", type=int, default=40, help="Rounded up to a multiple of 10.")
    parser.add_argument("--epochs", type=int, default=3, help="At least 2: the first is the warm-up.")
    parser.add_argument("--num-workers", type=int, default=2, help="data.num_workers for every method.")
    parser.add_argument("--compare-workers", type=int, nargs="*", default=[0], help="Also run these ...")
    parser.add_argument("--compare-methods", nargs="*", default=["linear"], help="... for these methods.")
    trainable = [m for m in method_names() if not get_method(m).condenses]  # pc needs a trained source run
    parser.add_argument("--methods", nargs="+", default=trainable, choices=trainable)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", action="store_true", help="Keep the dataset and run directories.")
    parser.add_argument("--extra", default="", help="More train options, e.g. '--device_data true'.")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is the warm-up).")
    per_class = {
        "train": math.ceil(args.train_images / NUM_CLASSES),
        "val": math.ceil(args.val_images / NUM_CLASSES),
        "test": 1,  # never evaluated by stage tune, but every split is loaded and checked
    }
    train_images = per_class["train"] * NUM_CLASSES
    if train_images < args.batch:
        parser.error(f"--train-images ({train_images}) must hold at least one batch ({args.batch}).")
    jobs = [(m, args.num_workers) for m in args.methods]
    jobs += [(m, w) for w in args.compare_workers if w != args.num_workers for m in args.compare_methods]

    print(
        f"torch {torch.__version__}, timm {timm.__version__}, selfprompt {sp.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads"
        + (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})" if "OMP_NUM_THREADS" in os.environ else "")
        + f", load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.model} (random weights), {args.img_size}px, batch {args.batch}, {args.epochs} epochs "
        f"(first = warm-up), stage tune, {NUM_CLASSES} classes, {train_images} train PNGs "
        f"({train_images // args.batch} steps/epoch), {per_class['val'] * NUM_CLASSES} val PNGs (evaluated "
        f"after the last epoch only), default method settings (vpt/spt-shallow M=100, deep M=20), "
        f"precision auto, device {args.device}"
    )
    work = Path(tempfile.mkdtemp(prefix="selfprompt-bench-"))
    try:
        root = write_image_folder(
            work / "data", num_classes=NUM_CLASSES, per_class=per_class, size=args.img_size
        )
        template = train_command(args, root, work / "<method>-w<workers>", "<method>", args.num_workers)
        print(f"each run: {shlex.join(['python', *template])}", flush=True)
        runs = [run_method(args, root, work, method, workers) for method, workers in jobs]
    finally:
        if args.keep:
            print(f"dataset and runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"device: {runs[0]['device']}")
    print(
        "\nimg/s and step s (epoch_time - data_time per step): medians over the epochs after the first; "
        "vs linear: step time against linear with the same workers;\nwait s: data_time per epoch (the loop "
        f"waiting for the loader); epoch/steps: epoch_time / (epoch_time - data_time), target <= {TARGET}x; "
        "run s: the whole subprocess;\ncpu: its CPU time (with its loader workers) / (run s x CPUs); others: "
        "CPU time of every other process on the machine meanwhile (and steal) / (run s x CPUs).\n"
    )
    print_table(runs)
    for workers in sorted({w for _, w in jobs} - {args.num_workers}):
        for method in args.compare_methods:
            a = next((r for r in runs if r["method"] == method and r["workers"] == args.num_workers), None)
            b = next((r for r in runs if r["method"] == method and r["workers"] == workers), None)
            if a and b:
                speed, step = b["images_per_s"] / a["images_per_s"], b["step_s"] / a["step_s"]
                print(
                    f"\n{method}: num_workers {workers} runs at {speed:.2f}x the images/s of num_workers "
                    f"{args.num_workers} (step time {step:.2f}x)"
                )
    for depth in ("shallow", "deep"):
        pair = [r for r in runs if r["method"] in (f"vpt-{depth}", f"spt-{depth}")]
        if len(pair) == 2 and pair[0]["workers"] == pair[1]["workers"]:
            spread = max(r["step_s"] for r in pair) / min(r["step_s"] for r in pair) - 1
            print(
                f"\nvpt-{depth} and spt-{depth} train the same model (only the initial prompts differ): "
                f"their step times differ by {100 * spread:.0f}%, this machine's run-to-run noise."
            )
    missed = [f"{r['method']} (workers {r['workers']})" for r in runs if r["overhead"] > TARGET]
    verdict = f"MISSED by {', '.join(missed)}" if missed else "met by every run"
    print(f"\nloader overhead target <= {TARGET}x: {verdict}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    busy = [r for r in runs if (r["others_share"] or 0.0) > NOISY]
    if busy:
        print(
            f"WARNING: other processes used more than {100 * NOISY:.0f}% of the CPUs during "
            f"{', '.join(r['method'] + ' (workers ' + str(r['workers']) + ')' for r in busy)}: "
            f"those timings are not this engine's; rerun on a quiet machine."
        )


if __name__ == "__main__":
    main()
