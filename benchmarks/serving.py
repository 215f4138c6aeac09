"""Serving figures on CPU: mixed-task batches, the HTTP server end to end, onnxruntime vs PyTorch.

(a) ``mixed``: a batch of B rows spread over T tasks (T = 1, 4, 16, 64; deep prompts, M = 10) through one
    :class:`MultiTaskViT` forward, against the same B rows of one task (one-task throughput) and against the
    same rows run task by task (each task's rows through its own ``PromptedViT``). Also rows with different
    prompt lengths (M in 5, 10, 20, 50), and the one-pass alternative (``mask=True``: padding + key mask).
    Images/s, best of ``--repeats``.
(b) ``server``: ``selfprompt serve`` on 127.0.0.1 with 4 tasks (the zoo's 32x32 MAE ViT), requests/s and
    p50/p99 latency at concurrency 1, 8, 32 (``--requests`` each), then a load test (``--load`` requests, 8
    concurrent, mixed tasks): errors and the server's RSS (all its processes) before and after.
(c) ``onnx``: one deep-prompted task exported with ``selfprompt.serving.export``, onnxruntime vs PyTorch
    eager, images/s at batch ``--batch``.

    python benchmarks/serving.py [--parts mixed server onnx] [--backbone vit_tiny_patch16_224] [--img-size N]
        [--batch 64] [--repeats 3] [--requests 200] [--load 2000]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import selfprompt  # noqa: F401  (before timm)
from selfprompt.backbones import create_backbone
from selfprompt.methods import load_pretrained
from selfprompt.methods.prompt import PromptedViT
from selfprompt.serving import MultiTaskViT
from selfprompt.serving.export import export_single

import timm
import torch
from PIL import Image

ZOO = "vit_mini_patch4_32.mae_fmnist"
SRC = Path(__file__).resolve().parents[1] / "src"


IMG_SIZE: int | None = None  # --img-size


def _backbone(name: str):
    torch.manual_seed(0)
    kwargs = {"img_size": IMG_SIZE} if IMG_SIZE else {}
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return images / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def bench_mixed(args, root: Path) -> None:
    size = _backbone(args.backbone).patch_embed.img_size
    images = torch.randn(args.batch, 3, *size)
    threads = torch.get_num_threads()
    print(f"(a) mixed-task batches: {args.backbone} at {size}, batch {args.batch}, {threads} threads")
    print(
        f"{'T':>4} {'prompts':>10} {'one task':>10} {'mixed':>10} {'ratio':>7} {'task by task':>13} "
        f"{'padded':>10}"
    )
    for lengths in ([10], [5, 10, 20, 50]):
        for tasks in (1, 4, 16, 64):
            multi = MultiTaskViT(_backbone(args.backbone))  # rows grouped by prompt length (the default)
            padded = MultiTaskViT(_backbone(args.backbone), mask=True)
            singles = {}
            for t in range(tasks):
                folder = root / f"{args.backbone}-{lengths[t % len(lengths)]}-{t}"
                if not folder.exists():
                    m = lengths[t % len(lengths)]
                    PromptedViT(_backbone(args.backbone), 10, num_prompts=m, deep=True).save_pretrained(
                        folder
                    )
                multi.add_adapter(f"t{t}", folder)
                padded.add_adapter(f"t{t}", folder)
                singles[f"t{t}"] = multi.tasks[f"t{t}"].model
            names = [f"t{i % tasks}" for i in range(args.batch)]
            one = _rate(lambda multi=multi: multi(images, ["t0"] * args.batch), args.batch, args.repeats)
            mixed = _rate(lambda multi=multi, names=names: multi(images, names), args.batch, args.repeats)

            def by_task(names=names, singles=singles):
                for name in dict.fromkeys(names):
                    rows = [i for i, n in enumerate(names) if n == name]
                    singles[name](images[rows])

            separate = _rate(by_task, args.batch, args.repeats)
            one_pass = _rate(lambda g=padded, names=names: g(images, names), args.batch, args.repeats)
            label = "10" if len(lengths) == 1 else "5/10/20/50"
            print(
                f"{tasks:>4} {label:>10} {one:>10.1f} {mixed:>10.1f} {mixed / one:>7.2f} {separate:>13.1f} "
                f"{one_pass:>10.1f}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kb(pid: int) -> int:
    """RSS of ``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _post(port: int, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = -1
    return status, time.perf_counter() - start


def _load(port: int, bodies: list[bytes], concurrency: int, deadline_s: float) -> tuple[list, float]:
    results, lock, index = [], threading.Lock(), iter(range(len(bodies)))
    end = time.monotonic() + deadline_s

    def worker():
        while time.monotonic() < end:
            with lock:
                i = next(index, None)
            if i is None:
                return
            outcome = _post(port, bodies[i])
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def bench_server(args, root: Path) -> None:
    torch.manual_seed(0)
    specs = []
    for t, (m, deep) in enumerate([(10, True), (5, False), (20, True), (1, False)]):
        folder = root / f"zoo-{t}"
        PromptedViT(create_backbone(ZOO), 10, num_prompts=m, deep=deep).save_pretrained(folder)
        specs.append(f"t{t}={folder}")
    port = _free_port()
    command = [sys.executable, "-m", "selfprompt", "serve", "--adapter", *specs, "--backbone", ZOO]
    command += ["--port", str(port), "--max_batch_size", "16", "--batch_timeout", "0.005"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    log = open(root / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (120, 40, 200)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()

        def body(i: int) -> bytes:
            return json.dumps({"image": image, "tasks": [f"t{i % 4}"], "topk": 3}).encode()

        print(f"(b) server: {ZOO}, 4 tasks, max_batch_size 16, batch_timeout 5 ms, one task per request")
        print(f"{'concurrency':>11} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        _load(port, [body(i) for i in range(20)], 4, 60)  # warm-up
        for concurrency in (1, 8, 32):
            results, wall = _load(port, [body(i) for i in range(args.requests)], concurrency, 120)
            latencies = sorted(r[1] for r in results)
            errors = sum(r[0] != 200 for r in results)
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(
                f"{concurrency:>11} {len(results):>9} {len(results) / wall:>8.1f} "
                f"{statistics.median(latencies) * 1e3:>8.1f} {p99 * 1e3:>8.1f} {errors:>7}"
            )
        before = _rss_kb(server.pid)
        results, wall = _load(port, [body(i) for i in range(args.load)], 8, 600)
        after = _rss_kb(server.pid)
        errors = sum(r[0] != 200 for r in results)
        print(
            f"load test: {len(results)} requests, 8 concurrent, mixed tasks, {wall:.1f} s, {errors} errors; "
            f"server RSS {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after"
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@torch.no_grad()
def bench_onnx(args, root: Path) -> None:
    import onnxruntime

    folder = root / f"{args.backbone}-onnx"
    PromptedViT(_backbone(args.backbone), 10, num_prompts=10, deep=True).save_pretrained(folder)
    model = load_pretrained(folder, _backbone(args.backbone)).eval()
    size = tuple(model.backbone.patch_embed.img_size)
    path = export_single(model, root / "model.onnx", size, [str(i) for i in range(10)])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(args.batch, 3, *size)
    feed = {"images": images.numpy()}
    eager = _rate(lambda: model(images), args.batch, args.repeats)
    ort = _rate(lambda: session.run(None, feed), args.batch, args.repeats)
    print(f"(c) {args.backbone}, deep prompts M=10, batch {args.batch}: PyTorch eager {eager:.1f} images/s, "
          f"onnxruntime {ort:.1f} images/s, ratio {ort / eager:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["mixed", "server", "onnx"])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=None, help="Input size (default: the backbone's).")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--load", type=int, default=2000)
    args = parser.parse_args()
    global IMG_SIZE
    IMG_SIZE = args.img_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for part in args.parts:
            {"mixed": bench_mixed, "server": bench_server, "onnx": bench_onnx}[part](args, root)


if __name__ == "__main__":
    main()
