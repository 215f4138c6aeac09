"""Serving figures on CPU: mixed-task batches, the HTTP server end to end, onnxruntime vs PyTorch.

(a) ``mixed``: a batch of B rows spread over T tasks (T = 1, 4, 16, 64; deep prompts, M = 10) through one
    :class:`MultiTaskViT` forward, against the same B rows of one task (one-task throughput) and against the
    same rows run task by task (each task's rows through its own ``PromptedViT``). Also rows with different
    prompt lengths (M in 5, 10, 20, 50), grouped by length and packed into one call per block (the default),
    "unpacked" (the length groups run one after another), the one-pass alternative (``mask=True``: padding +
    key mask), and "equal M": B rows of one task whose M is the batch's mean (the same tokens per row on
    average).
(b) ``server``: ``selfprompt serve`` on 127.0.0.1 with 4 tasks (the zoo's 32x32 MAE ViT), requests/s and
    p50/p99 latency at concurrency 1, 8, 32 (``--requests`` each), then a load test (``--load`` requests, 8
    concurrent, mixed tasks): errors and the server's RSS (all its processes) before and after.
(c) ``onnx``: one deep-prompted task exported with ``selfprompt.serving.export``, onnxruntime (as exported,
    and after ``onnxruntime.transformers.optimizer``'s fusions) vs PyTorch eager, images/s at ``--batch``.
Images/s at the median of ``--repeats`` interleaved rounds (each round times every variant once, in a rotating
order); ratios are medians of the per-round paired ratios.

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


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``repeats`` rounds, every round timing each once in a rotating
    order, so that drifts in the machine's speed fall on all of them alike (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(fns[name]))
    return times


def _rate(times: list[float], images: int) -> float:
    """Images/s at the median time."""
    return images / statistics.median(times)


def _speedup(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over rounds of ``slow``'s time over ``fast``'s (a paired ratio: > 1 when ``fast`` is faster)."""
    return statistics.median(b / a for a, b in zip(times[fast], times[slow], strict=True))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _adapter(root: Path, backbone: str, num_prompts: int, index: int) -> Path:
    folder = root / f"{backbone}-{num_prompts}-{index}"
    if not folder.exists():
        PromptedViT(_backbone(backbone), 10, num_prompts=num_prompts, deep=True).save_pretrained(folder)
    return folder


@torch.no_grad()
def bench_mixed(args, root: Path) -> None:
    size = _backbone(args.backbone).patch_embed.img_size
    images = torch.randn(args.batch, 3, *size)
    threads = torch.get_num_threads()
    print(f"(a) mixed-task batches: {args.backbone} at {size}, batch {args.batch}, {threads} threads")
    print(
        f"{'T':>4} {'prompts':>10} {'one task':>10} {'mixed':>10} {'ratio':>7} {'equal M':>10} {'ratio':>7} "
        f"{'task by task':>13} {'unpacked':>9} {'padded':>10}"
    )
    for lengths in ([10], [5, 10, 20, 50]):
        for tasks in (1, 4, 16, 64):
            multi = MultiTaskViT(_backbone(args.backbone))  # rows grouped by prompt length (the default)
            padded = MultiTaskViT(_backbone(args.backbone), mask=True)
            unpacked = MultiTaskViT(_backbone(args.backbone))
            unpacked.packed = False
            for t in range(tasks):
                folder = _adapter(root, args.backbone, lengths[t % len(lengths)], t)
                for model in (multi, padded, unpacked):
                    model.add_adapter(f"t{t}", folder)
            names = [f"t{i % tasks}" for i in range(args.batch)]
            mean_m = round(statistics.mean(multi.tasks[n].model.num_prompts for n in names))
            multi.add_adapter("equal", _adapter(root, args.backbone, mean_m, -1))

            def by_task(names=names, multi=multi):
                for name in dict.fromkeys(names):
                    multi.tasks[name].model(images[[i for i, n in enumerate(names) if n == name]])

            times = _interleaved(
                {
                    "one": lambda multi=multi: multi(images, ["t0"] * args.batch),
                    "mixed": lambda multi=multi, names=names: multi(images, names),
                    "equal": lambda multi=multi: multi(images, ["equal"] * args.batch),
                    "by_task": by_task,
                    "unpacked": lambda g=unpacked, names=names: g(images, names),
                    "padded": lambda g=padded, names=names: g(images, names),
                },
                args.repeats,
            )
            rate = {name: _rate(t, args.batch) for name, t in times.items()}
            label = "10" if len(lengths) == 1 else "5/10/20/50"
            print(
                f"{tasks:>4} {label:>10} {rate['one']:>10.1f} {rate['mixed']:>10.1f} "
                f"{_speedup(times, 'mixed', 'one'):>7.2f} {rate['equal']:>10.1f} "
                f"{_speedup(times, 'mixed', 'equal'):>7.2f} {rate['by_task']:>13.1f} "
                f"{rate['unpacked']:>9.1f} {rate['padded']:>10.1f}"
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
    from onnxruntime.transformers.optimizer import optimize_model

    folder = root / f"{args.backbone}-onnx"
    PromptedViT(_backbone(args.backbone), 10, num_prompts=10, deep=True).save_pretrained(folder)
    model = load_pretrained(folder, _backbone(args.backbone)).eval()
    size = tuple(model.backbone.patch_embed.img_size)
    path = export_single(model, root / "model.onnx", size, [str(i) for i in range(10)])
    heads = model.backbone.blocks[0].attn.num_heads
    fused = optimize_model(str(path), "vit", num_heads=heads, hidden_size=model.embed_dim, opt_level=0)
    fused.save_model_to_file(str(root / "fused.onnx"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    images = torch.randn(args.batch, 3, *size)
    feed = {"images": images.numpy()}
    sessions = {
        name: onnxruntime.InferenceSession(str(root / name), options, providers=["CPUExecutionProvider"])
        for name in ("model.onnx", "fused.onnx")
    }
    expected = model(images)
    for name, session in sessions.items():
        diff = (torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max().item()
        print(f"(c) {name}: max |onnxruntime - PyTorch| {diff:.1e}")
    times = _interleaved(
        {
            "eager": lambda: model(images),
            "ort": lambda: sessions["model.onnx"].run(None, feed),
            "fused": lambda: sessions["fused.onnx"].run(None, feed),
        },
        args.repeats,
    )
    rate = {name: _rate(t, args.batch) for name, t in times.items()}
    threads = options.intra_op_num_threads
    print(
        f"(c) {args.backbone}, deep prompts M=10, batch {args.batch}, {threads} threads: PyTorch eager "
        f"{rate['eager']:.1f} images/s, onnxruntime {rate['ort']:.1f} "
        f"({_speedup(times, 'ort', 'eager'):.2f}x), "
        f"onnxruntime after its transformer fusions (SkipLayerNorm, BiasGelu) {rate['fused']:.1f} "
        f"({_speedup(times, 'fused', 'eager'):.2f}x)"
    )


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
