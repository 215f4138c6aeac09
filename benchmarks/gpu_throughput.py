"""Training and inference throughput, memory and MFU of every method under fp32, bf16 autocast and compile.

One process, random-weight backbone (no hub), 224 px. For each method (linear, full, vpt-deep and spt-deep
with M prompts, then every other registered method at its defaults) and each setting:

- ``fp32``: fp32 eager, the official code's setting (TF32 matmuls where the GPU has them, as the engine's
  default ``--tf32 true``); ``bf16``: bf16 autocast, eager; ``bf16-compile``: bf16 autocast + torch.compile
  (mode ``default``, engine/speed.py); ``fp32-compile``: for a CPU comparison.

it reports training images/s (forward + backward + AdamW, fused on CUDA), inference images/s (no grad),
the compile warm-up, peak memory (CUDA: max allocated during the training steps; everywhere: the bytes the
autograd graph saves for the backward pass) and MFU: the model FLOPs of a step
(``torch.utils.flop_counter``) per second over the device's peak (printed; ``--peak-tflops`` overrides).
Then the memory of vpt-deep on ViT-B/16 with and without activation checkpointing, and SPT's deep
initialisation (``sample``, ``kmeans``) against one no-grad forward pass over the same images.

    python benchmarks/gpu_throughput.py                       # a GPU: vit_base_patch16_224, batch 128
    python benchmarks/gpu_throughput.py --batch 4 --rounds 3 --init-images 64   # CPU: a tiny size
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import selfprompt as sp  # before timm (see README)

import timm
import torch
from method_step_time import build, saved_bytes  # the benchmarks' model builder and autograd-memory probe
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

MAIN = ["linear", "full", "vpt-deep", "spt-deep"]
SETTINGS = {  # name: (autocast dtype, compile)
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "bf16-compile": (torch.bfloat16, True),
    "fp32-compile": (None, True),
}
# dense peak TFLOP/s by device-name fragment: (bf16 tensor cores, tf32 tensor cores)
PEAKS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L4": (121.0, 60.0)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], rounds: int, device: torch.device) -> float:
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops(device: torch.device, dtype: torch.dtype | None, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, tf32) in PEAKS.items():
        if fragment in name:
            return bf16 if dtype is not None else tf32
    return None


def measure(
    model: sp.ViTClassifier, setting: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """One method under one setting: step and inference times, warm-up, memory, FLOPs."""
    device = x.device
    dtype, compile_ = SETTINGS[setting]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    params = list(model.adapter_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda" or None)
    net = torch.compile(model) if compile_ else model

    def train() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        with autocast:
            net(x)

    model.train()
    started = time.perf_counter()
    train()
    train()
    sync(device)
    warmup = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = median_seconds(train, args.rounds, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    step_flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)

    def forward() -> torch.Tensor:
        with autocast:
            return model(x)

    saved = saved_bytes(forward) / 2**20
    model.eval()
    infer()
    infer()
    inference = median_seconds(infer, args.rounds, device)
    with FlopCounterMode(display=False) as counter:  # with grad on: its module tracker needs grad_fns
        model(x)
    top = peak_tflops(device, dtype, args.peak_tflops)
    return {
        "setting": setting,
        "train_images_s": len(x) / step,
        "infer_images_s": len(x) / inference,
        "step_s": step,
        "warmup_s": warmup,
        "peak_mb": peak,
        "saved_mb": saved,
        "train_gflop": step_flops / 1e9,
        "infer_gflop": counter.get_total_flops() / 1e9,
        "train_mfu": step_flops / step / (top * 1e12) if top else None,
        "infer_mfu": counter.get_total_flops() / inference / (top * 1e12) if top else None,
    }


def checkpointing_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """vpt-deep on ViT-B/16: saved-for-backward MB (and CUDA peak) of one step without and with
    activation checkpointing of the blocks."""
    model = build("vpt-deep", "vit_base_patch16_224", args.prompts).to(device).train()
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = {}
    for checkpointing in (False, True):
        model.checkpoint_blocks = checkpointing
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step() -> None:
            torch.nn.functional.cross_entropy(model(x), y).backward()

        saved = saved_bytes(step) / 2**20
        seconds = median_seconds(step, max(1, args.rounds // 2), device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows["on" if checkpointing else "off"] = {"saved_mb": saved, "peak_mb": peak, "step_s": seconds}
        model.zero_grad(set_to_none=True)
    return rows


def init_times(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """SPT's deep ``sample`` and ``kmeans`` initialisation against one no-grad forward over the images."""
    images = torch.randn(args.init_images, 3, 224, 224, device=device)
    loader = DataLoader(TensorDataset(images, torch.zeros(args.init_images)), batch_size=args.batch)
    backbone = timm.create_model(args.model, num_classes=0).to(device).eval()

    def forward_all() -> None:
        with torch.no_grad():
            for batch, _ in loader:
                backbone(batch)

    forward_all()
    forward = median_seconds(forward_all, args.init_repeats, device)
    result: dict[str, Any] = {"images": args.init_images, "forward_s": forward}
    for method in ("sample", "kmeans"):
        model = sp.PromptedViT(backbone, 10, num_prompts=args.prompts, deep=True).to(device)
        seconds = median_seconds(
            lambda m=model, n=method: sp.init_prompts(m, loader, n), args.init_repeats, device
        )
        result[method] = {"seconds": seconds, "vs_forward": seconds / forward}
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="128 on a GPU, 4 on CPU")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--methods", nargs="+", default=None, help="default: linear, full, vpt-deep, spt-deep, rest"
    )
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS))
    parser.add_argument("--compile-methods", nargs="+", default=MAIN, help="methods run under compile")
    parser.add_argument("--init-images", type=int, default=1000)
    parser.add_argument("--init-repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the ViT-B/16 memory check")
    parser.add_argument("--no-init", action="store_true", help="skip the SPT initialisation times")
    parser.add_argument("--json", default="gpu_throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (128 if device.type == "cuda" else 4)
    settings = args.settings or (
        ["fp32", "bf16", "bf16-compile"] if device.type == "cuda" else ["fp32", "fp32-compile"]
    )
    methods = args.methods or MAIN + [m for m in sp.method_names() if m not in MAIN]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, selfprompt {sp.__version__}, {device} "
        f"({name}), {torch.get_num_threads()} threads; "
        f"{args.model}, batch {args.batch}, {args.img_size} px, M={args.prompts}"
    )
    print(
        "peak assumed (TFLOP/s): "
        + ", ".join(
            f"{s}: {fmt(peak_tflops(device, SETTINGS[s][0], args.peak_tflops), '.0f')}" for s in settings
        )
    )
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = []
    print(
        "\n| method | setting | train img/s | infer img/s | step s | warm-up s | peak MB | saved MB | "
        "train MFU | infer MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        model = build(method, args.model, args.prompts, args.img_size).to(device)
        for setting in settings:
            if SETTINGS[setting][1] and method not in args.compile_methods:
                continue
            torch._dynamo.reset()
            row = {"method": method, **measure(model, setting, x, y, args)}
            rows.append(row)
            print(
                f"| {method} | {setting} | {row['train_images_s']:.1f} | {row['infer_images_s']:.1f} | "
                f"{row['step_s']:.3f} | {row['warmup_s']:.1f} | {fmt(row['peak_mb'], '.0f')} | "
                f"{row['saved_mb']:.0f} | {fmt(row['train_mfu'], '.1%')} | {fmt(row['infer_mfu'], '.1%')} |",
                flush=True,
            )
        del model
    result: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "model": args.model,
        "batch": args.batch,
        "prompts": args.prompts,
        "rows": rows,
    }
    if not args.no_checkpointing:
        memory = checkpointing_memory(args, device)
        result["checkpointing"] = memory
        print(f"\nvpt-deep, vit_base_patch16_224, batch {args.batch}: activation checkpointing of the blocks")
        for key, value in memory.items():
            print(
                f"  {key:3s}: saved for backward {value['saved_mb']:.0f} MB, CUDA peak "
                f"{fmt(value['peak_mb'], '.0f')} MB, fwd+bwd {value['step_s']:.3f} s"
            )
    if not args.no_init:
        init_report(args, device, result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


def init_report(args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> None:
    init = init_times(args, device)
    result["init"] = init
    print(
        f"\nSPT deep initialisation over {init['images']} images; "
        f"one no-grad forward {init['forward_s']:.3f} s"
    )
    for method in ("sample", "kmeans"):
        print(f"  {method:7s} {init[method]['seconds']:.3f} s ({init[method]['vs_forward']:.2f}x)")


if __name__ == "__main__":
    main()
