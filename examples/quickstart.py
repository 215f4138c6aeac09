"""Quickstart: VPT-deep vs SPT-deep prompts on a generated image task, fully offline, about a minute on a CPU.

Images are noisy sine gratings. No pretrained ViT can be downloaded here, so the script first pretrains a
small timm ViT for a few seconds on one task (grating orientation, 8 classes), then freezes it and tunes
prompts + head for another (grating frequency, 4 classes). The numbers show the mechanics (init, train only
prompts + head, save, reload); the paper-scale comparison needs real pretrained backbones.

    python examples/quickstart.py [--epochs 3] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import selfprompt as sp  # import before timm (see README)

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset


def gratings(n: int, seed: int, label: str, size: int = 32) -> TensorDataset:
    """Sine gratings labelled by orientation (8 classes) or by frequency band (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    orientation = torch.randint(0, 8, (n,), generator=g)
    band = torch.randint(0, 4, (n,), generator=g)
    angle = orientation.float() * math.pi / 8
    freq = 0.25 + 0.25 * (band.float() + torch.rand(n, generator=g))
    phase = 2 * math.pi * torch.rand(n, generator=g)
    labels = orientation if label == "orientation" else band
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    images = wave[:, None].expand(-1, 3, -1, -1) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(images, labels)


def accuracy(model: sp.PromptedViT, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return hits / len(loader.dataset)


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One pass of cross-entropy training; returns the last batch's loss."""
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def pretrain_backbone(epochs: int = 2) -> VisionTransformer:
    """Supervised pretraining of a small ViT on grating orientation (the upstream task)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=8)
    data = DataLoader(gratings(2048, seed=10, label="orientation"), batch_size=64, shuffle=True)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    for _ in range(epochs):
        loss = train_epoch(vit, data, optimizer)
    print(f"pretrained the backbone on orientation: last loss {loss:.3f}")
    vit.reset_classifier(0)
    return vit.eval()


def run(
    method: str, backbone: VisionTransformer, train: DataLoader, val: DataLoader, epochs: int
) -> tuple[sp.PromptedViT, float]:
    torch.manual_seed(0)
    model = sp.PromptedViT(backbone, num_classes=4, num_prompts=8, deep=True, backbone_name="quickstart-vit")
    sp.init_prompts(model, train, "xavier" if method == "vpt-deep" else "sample", fraction=0.5, seed=0)
    optimizer = torch.optim.AdamW(model.adapter_parameters().values(), lr=2e-2, weight_decay=1e-4)
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model.train(), train, optimizer)
        print(f"  {method:9s} epoch {epoch}: last loss {loss:.3f}, val acc {accuracy(model, val):.3f}")
    return model, accuracy(model, val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone = pretrain_backbone()
    shuffle = torch.Generator().manual_seed(0)
    train = DataLoader(
        gratings(768, seed=0, label="frequency"), batch_size=32, shuffle=True, generator=shuffle
    )
    val = DataLoader(gratings(256, seed=1, label="frequency"), batch_size=128)
    rows = []
    for method in ("vpt-deep", "spt-deep"):
        start = time.perf_counter()
        model, acc = run(method, backbone, train, val, args.epochs)
        model.save_pretrained(args.out / method)
        reloaded = sp.PromptedViT.from_pretrained(
            args.out / method, backbone=model.backbone, backbone_name="quickstart-vit"
        )
        assert accuracy(reloaded, val) == acc, "reloaded adapter disagrees"
        size_kb = (args.out / method / "adapter.safetensors").stat().st_size / 1024
        rows.append((method, acc, model.num_adapter_parameters(), size_kb, time.perf_counter() - start))
    print(f"\n{'method':10s} {'val acc':>8s} {'trainable':>10s} {'adapter':>9s} {'time':>7s}")
    for method, acc, params, kb, seconds in rows:
        print(f"{method:10s} {acc:8.3f} {params:10,d} {kb:7.1f}KB {seconds:6.1f}s")
    print(f"\nAdapters (prompts + head, safetensors + JSON) saved under {args.out}/")


if __name__ == "__main__":
    main()
