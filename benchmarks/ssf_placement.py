"""SSF's last scale and shift on a backbone whose final norm comes after pooling: ours (``after_norm``, after
that norm, foldable) against the official code's (``tokens``, on the tokens before pooling), trained alike.

On the MAE zoo backbone (``vit_mini_patch4_32.mae_fmnist``, ``mae`` pooling) and VTAB-mini tasks written
offline, per task, seed and placement: train on train800 (AdamW, the vtab_mini ssf recipe's lr 5e-3 and
weight decay 0, one warm-up epoch then cosine, batch 64, no augmentation), evaluate val200 after every
epoch, keep the best epoch's weights, and evaluate test once with them. Both placements of one seed start
from the same head and the same draws for every shared scale and shift. Prints each run, then the mean and
standard deviation of test accuracy per task and placement, and the difference (tokens - after_norm) paired
by seed. One thread: the machine it was written for is shared.

    python benchmarks/ssf_placement.py [--root /tmp/vtab-mini] [--tasks clevr_count mnist]
        [--seeds 0 1 2] [--epochs 4] [--max-test 1000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import selfprompt  # noqa: F401  (before timm, see README)
from selfprompt.data.transforms import build_transform, data_config
from selfprompt.data.vtab_mini import prepare
from selfprompt.methods.ssf import SSF

import timm
import torch
from PIL import Image

BACKBONE = "vit_mini_patch4_32.mae_fmnist"
PLACEMENTS = ("after_norm", "tokens")


def load_split(
    folder: Path, split: str, transform, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [line.split() for line in (folder / f"{split}.txt").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    images = torch.stack([transform(Image.open(folder / path).convert("RGB")) for path, _ in rows])
    return images, torch.tensor([int(label) for _, label in rows])


@torch.no_grad()
def accuracy(model: SSF, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(256)])
    return (predictions == labels).float().mean().item()


def train_one(
    backbone: torch.nn.Module, data: dict, num_classes: int, placement: str, seed: int, epochs: int
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = SSF(backbone, num_classes, pool="mae", final_placement=placement)
    params = list(model.adapter_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    images, labels = data["train800"]
    batches = math.ceil(len(labels) / 64)
    total, warmup = epochs * batches, batches
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        ),
    )
    order = torch.Generator().manual_seed(seed)
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(labels), generator=order).split(64):
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        val = accuracy(model, *data["val200"])
        if val > best_val:
            best_val = val
            best_state = {k: p.detach().clone() for k, p in model.adapter_parameters().items()}
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            param.copy_(best_state[name])
    return {"val": best_val, "test": accuracy(model, *data["test"])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/vtab-mini"))
    parser.add_argument("--tasks", nargs="+", default=["clevr_count", "mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-test", type=int, default=1000, help="first N test images (the list's order)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    missing = [task for task in args.tasks if not (args.root / task / "manifest.json").exists()]
    if missing:
        prepare(args.root, missing)
    backbone = timm.create_model(BACKBONE, pretrained=True, num_classes=0)
    transform = build_transform(data_config(backbone, crop_pct=1.0), train=False)
    print(f"{BACKBONE}, mae pooling, epochs {args.epochs}, seeds {args.seeds}, test <= {args.max_test}")
    results: dict[tuple[str, str], list[float]] = {}
    started = time.time()
    for task in args.tasks:
        folder = args.root / task
        data = {
            split: load_split(folder, split, transform, args.max_test if split == "test" else None)
            for split in ("train800", "val200", "test")
        }
        num_classes = int(max(data["train800"][1].max(), data["test"][1].max())) + 1
        for seed in args.seeds:
            for placement in PLACEMENTS:
                run = train_one(backbone, data, num_classes, placement, seed, args.epochs)
                results.setdefault((task, placement), []).append(run["test"])
                print(
                    f"{task:14s} seed {seed} {placement:10s} best val {100 * run['val']:6.2f}  "
                    f"test {100 * run['test']:6.2f}  ({time.time() - started:.0f} s)",
                    flush=True,
                )
    print(f"\n{'task':14s} {'placement':10s} {'test mean':>9s} {'std':>6s}   tokens - after_norm (paired)")
    for task in args.tasks:
        ours, official = results[(task, "after_norm")], results[(task, "tokens")]
        diffs = [b - a for a, b in zip(ours, official, strict=True)]
        for placement, accs in (("after_norm", ours), ("tokens", official)):
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            extra = ""
            if placement == "tokens":
                spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                extra = f"   {100 * statistics.fmean(diffs):+.2f} +- {100 * spread:.2f}"
            print(f"{task:14s} {placement:10s} {100 * statistics.fmean(accs):9.2f} {100 * std:6.2f}{extra}")
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
