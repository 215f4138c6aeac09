"""The engine options (``RunOptions``: compile, fused AdamW, TF32, bf16 backbone, checkpointing,
device-resident data): what each does to a run, and the record of what a run used (env.json's ``engine``).

None changes what is computed beyond rounding, except ``backbone_dtype bf16`` (the frozen weights rounded
to bf16) and TF32 on GPUs (fp32 matmuls with 10-bit mantissas).

``compile`` uses torch.compile's ``default`` mode: ``reduce-overhead`` records CUDA graphs, which need static
input addresses and re-record for every new batch shape, and ``max-autotune`` spends minutes benchmarking
kernels, more than a VTAB-1k run's few hundred steps can win back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from selfprompt.config import RunOptions
from selfprompt.engine.distributed import Context

import torch
from torch import nn
from torch.utils.data import DataLoader

COMPILE_MODE = "default"


def autocast_dtype(ctx: Context, precision: str) -> torch.dtype | None:
    """bf16 when ``precision`` runs under bf16 autocast on ``ctx``'s device, else None (fp32)."""
    bf16 = precision == "bf16" or (
        precision == "auto" and ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.bfloat16 if bf16 else None


def has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def uses_fused_adamw(run: RunOptions, ctx: Context) -> bool:
    return run.fused_adamw and ctx.device.type == "cuda"


def set_tf32(run: RunOptions, ctx: Context) -> None:
    """TF32 matmuls and convolutions on a GPU that has them, as ``run.tf32`` says (process-wide)."""
    if has_tf32(ctx.device):
        torch.backends.cuda.matmul.allow_tf32 = run.tf32
        torch.backends.cudnn.allow_tf32 = run.tf32


def hold_frozen_in_bf16(model: nn.Module) -> int:
    """Cast the frozen matrices (linear and convolution weights, embeddings: nearly all of a ViT's bytes)
    to bf16 in place; trainable parameters and the 1-D ones (norms, biases) stay fp32. Returns how many
    were cast. The model must then run under bf16 autocast."""
    frozen = [
        p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32 and p.ndim >= 2
    ]
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    return len(frozen)


def prepare_model(model: nn.Module, run: RunOptions) -> nn.Module:
    """Apply ``backbone_dtype`` and ``checkpointing`` to ``model`` (in place) before its first step."""
    if run.backbone_dtype == "bf16":
        hold_frozen_in_bf16(model)
    if run.checkpointing:
        model.checkpoint_blocks = True
    return model


def compiled(net: nn.Module, run: RunOptions) -> nn.Module:
    """``net`` under torch.compile when ``run.compile``; its parameters and state dict stay ``net``'s."""
    return torch.compile(net, mode=COMPILE_MODE) if run.compile else net


class ResidentLoader:
    """A training loader whose samples stay on the device once decoded.

    The first epoch reads the loader and keeps its samples in one device tensor; later epochs index that
    tensor in the sampler's order, the same batches the loader would give, reading in the main process
    only the samples not seen yet (those the loader dropped with the last partial batch, or of another
    process's shard). Only valid when a
    sample is the same every epoch (no random augmentation). ``dtype`` stores the images rounded (bf16
    where the model runs under bf16 autocast, which rounds its input the same way).
    """

    def __init__(self, loader: DataLoader, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.loader, self.device, self.dtype = loader, device, dtype
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.cached = torch.zeros(len(loader.dataset), dtype=torch.bool)  # type: ignore[arg-type]

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.loader.sampler.sampler), dtype=torch.long)  # this epoch's indices
        micro = self.loader.batch_size
        batches = order[: len(order) // micro * micro].view(-1, micro)  # the loader drops the last part
        if self.images is not None:
            for index in batches.flatten()[~self.cached[batches.flatten()]].tolist():  # dropped until now
                image, label = self.loader.dataset[(index, 0)]  # SeededSamples: no augmentation to seed
                self.images[index] = torch.as_tensor(image).to(self.device, self.images.dtype)
                self.labels[index] = torch.as_tensor(label).to(self.device)  # type: ignore[index]
                self.cached[index] = True
            for rows in batches.to(self.device):
                yield self.images[rows], self.labels[rows]  # type: ignore[index]
            return
        for rows, (images, labels) in zip(batches, self.loader, strict=True):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.images is None:
                size = len(self.cached)
                dtype = self.dtype or images.dtype
                self.images = torch.empty((size, *images.shape[1:]), dtype=dtype, device=self.device)
                self.labels = torch.empty((size, *labels.shape[1:]), dtype=labels.dtype, device=self.device)
            self.images[rows.to(self.device)] = images.to(self.images.dtype)
            self.labels[rows.to(self.device)] = labels  # type: ignore[index]
            self.cached[rows] = True
            yield images, labels


def engine_record(run: RunOptions, ctx: Context) -> dict[str, Any]:
    """What the engine options resolved to on this device: env.json's ``engine``."""
    return {
        "compile": COMPILE_MODE if run.compile else None,
        "fused_adamw": uses_fused_adamw(run, ctx),
        "tf32": run.tf32 and has_tf32(ctx.device),
        "autocast": str(autocast_dtype(ctx, run.precision) or "off").removeprefix("torch."),
        "backbone_dtype": run.backbone_dtype,
        "checkpointing": run.checkpointing,
        "device_data": run.device_data,
    }
