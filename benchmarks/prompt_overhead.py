"""Cost of prompt tuning against its physical floor, and of each prompt initializer against one forward pass.

1. Training step (forward + backward + AdamW step) of PromptedViT shallow and deep against timm's own
   VisionTransformer built with ``reg_tokens=M`` and only those register tokens + head trainable: the same
   sequence length, so the floor any prompt-tuning implementation can reach. Steps are interleaved
   round-robin so that machine drift hits all models alike; medians are reported.
2. Prompt initialisation (shallow and deep) against one plain no-grad forward pass of the backbone over the
   same images.

    python benchmarks/prompt_overhead.py [--model vit_tiny_patch16_224] [--prompts 10] [--rounds 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import selfprompt as sp  # before timm (see README)

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], x, y) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_times(args: argparse.Namespace) -> None:
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 10, (args.batch,))
    floor = timm.create_model(args.model, num_classes=10, reg_tokens=args.prompts).train()
    for name, p in floor.named_parameters():
        p.requires_grad_(name in ("reg_token", "head.weight", "head.bias"))
    steps = {
        "timm reg_tokens=M (floor)": train_step(
            floor, [p for p in floor.parameters() if p.requires_grad], x, y
        )
    }
    for deep in (False, True):
        model = sp.PromptedViT(
            timm.create_model(args.model, num_classes=0), 10, num_prompts=args.prompts, deep=deep
        ).train()
        steps[f"PromptedViT {'deep' if deep else 'shallow'}"] = train_step(
            model, list(model.adapter_parameters().values()), x, y
        )
    for step in steps.values():  # warm-up
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["timm reg_tokens=M (floor)"])
    print(
        f"\nTraining step, {args.model}, batch {args.batch}, M={args.prompts}, median of {args.rounds} rounds"
    )
    print(f"{'model':28s} {'median s':>9s} {'vs floor':>9s}")
    for name, values in times.items():
        print(f"{name:28s} {statistics.median(values):9.3f} {statistics.median(values) / base:8.3f}x")


def init_times(args: argparse.Namespace) -> None:
    images = torch.randn(args.images, 3, 224, 224)
    loader = DataLoader(TensorDataset(images, torch.zeros(args.images)), batch_size=args.batch)
    backbone = timm.create_model(args.model, num_classes=0).eval()

    def forward_all() -> None:
        with torch.no_grad():
            for batch, _ in loader:
                backbone(batch)

    forward = median_seconds(forward_all, args.init_repeats)
    print(f"\nPrompt initialisation over {args.images} images, median of {args.init_repeats}")
    print(f"one plain forward pass (no grad): {forward:.3f} s")
    print(f"{'method':10s} {'shallow s':>10s} {'ratio':>7s} {'deep s':>8s} {'ratio':>7s}")
    for method in sp.available_initializers():
        row = []
        for deep in (False, True):
            model = sp.PromptedViT(backbone, 10, num_prompts=args.prompts, deep=deep)
            seconds = median_seconds(
                lambda m=model, name=method: sp.init_prompts(m, loader, name), args.init_repeats
            )
            row += [seconds, seconds / forward]
        print(f"{method:10s} {row[0]:10.3f} {row[1]:6.2f}x {row[2]:8.3f} {row[3]:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--init-repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, selfprompt {sp.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    step_times(args)
    init_times(args)


if __name__ == "__main__":
    main()
