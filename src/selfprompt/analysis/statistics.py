"""Per-layer statistics of prompts against patch tokens, at each block's input, on a fixed probe batch."""

from __future__ import annotations

from dataclasses import dataclass

from selfprompt.analysis.estimators import pairwise_nmi
from selfprompt.init.kmeans import kmeans

import torch
import torch.nn.functional as F
from torch import nn

STATISTICS: tuple[str, ...] = (
    "nmi_max",
    "nmi_mean",
    "inertia_ratio",
    "nearest_cosine",
    "prompt_norm",
    "patch_norm",
)


@dataclass
class BlockInput:
    """The prompt and patch tokens entering one block: ``prompts`` (B, M, D), ``patches`` (B, N, D).

    For deep prompts, ``prompts`` is that layer's prompt parameter for every image; for shallow prompts,
    the prompt states that travelled through the earlier blocks (they differ per image).
    """

    prompts: torch.Tensor
    patches: torch.Tensor


@torch.no_grad()
def block_inputs(model: nn.Module, images: torch.Tensor) -> list[BlockInput]:
    """The prompt and patch tokens at the input of every block, in eval mode (no prompt dropout).

    Token layout entering a block: ``[prefix ; prompts ; patches]``; prefix tokens (class, registers) are
    left out. The model's train/eval mode is restored afterwards.
    """
    if not getattr(model, "num_prompts", 0):
        raise TypeError(f"block_inputs needs a model with prompts, got {type(model).__name__}.")
    p, m = model.num_prefix_tokens, model.num_prompts
    captured: list[BlockInput] = []

    def capture(_module, args) -> None:
        x = args[0].float()
        captured.append(BlockInput(prompts=x[:, p : p + m], patches=x[:, p + m :]))

    handles = [block.register_forward_pre_hook(capture) for block in model.backbone.blocks]
    training = model.training
    try:
        model.eval()
        model.forward_features(images)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return captured


def inertia(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sum over ``points`` (B, N, D) of the squared distance to the nearest of their image's ``centres``
    (B, M, D)."""
    return torch.cdist(points, centres).pow(2).amin(dim=-1).sum()


KMEANS_ITERATIONS = 20  # Lloyd iterations of the reference k-means: within 0.25% of converged (docs)


def layer_statistics(
    layer: BlockInput,
    *,
    bins: int | None = None,
    generator: torch.Generator | None = None,
    kmeans_iterations: int = KMEANS_ITERATIONS,
) -> dict[str, float]:
    """The statistics of one block input (names in ``STATISTICS``):

    - ``nmi_max`` / ``nmi_mean``: per prompt, the max / mean NMI (:func:`pairwise_nmi`) over the patch
      tokens of the same image; averaged over prompts and images;
    - ``inertia_ratio``: the patch tokens' inertia with the prompts as centres (each image's own prompts)
      over the inertia of k-means with K = M on all probe patch tokens: 1 when the prompts are k-means'
      centres, above 1 the farther they are from the patch-token clusters (it can dip slightly below 1:
      k-means finds a local optimum, and shallow prompt states differ per image);
    - ``nearest_cosine``: mean over patch tokens of the cosine similarity to the nearest prompt;
    - ``prompt_norm`` / ``patch_norm``: mean L2 norm of the prompts / the patch tokens.

    ``generator`` seeds k-means (a fixed seed gives the same reference every time); ``kmeans_iterations``
    caps its Lloyd iterations, which bounds the cost (a capped reference inertia is slightly higher, so the
    ratio slightly lower, than a converged one).
    """
    prompts, patches = layer.prompts, layer.patches
    nmi = pairwise_nmi(prompts, patches, bins)  # (B, M, N)
    flat = patches.reshape(-1, patches.shape[-1])
    generator = generator or torch.Generator().manual_seed(0)
    reference = kmeans(flat, prompts.shape[1], generator, max_iter=kmeans_iterations).inertia
    cosine = F.normalize(patches, dim=-1) @ F.normalize(prompts, dim=-1).transpose(-2, -1)
    return {
        "nmi_max": nmi.amax(dim=-1).mean().item(),
        "nmi_mean": nmi.mean().item(),
        "inertia_ratio": inertia(patches, prompts).item() / max(reference, torch.finfo(torch.float32).tiny),
        "nearest_cosine": cosine.amax(dim=-1).mean().item(),
        "prompt_norm": prompts.norm(dim=-1).mean().item(),
        "patch_norm": patches.norm(dim=-1).mean().item(),
    }


def prompt_patch_statistics(
    model: nn.Module, images: torch.Tensor, *, bins: int | None = None, seed: int = 0
) -> list[dict[str, float]]:
    """:func:`layer_statistics` of every block's input for the probe ``images``; one dict per block.

    Deterministic for fixed images, prompts and ``seed`` (which seeds the k-means reference); draws nothing
    from the global random state, so tracking does not change a training run.
    """
    return [
        layer_statistics(layer, bins=bins, generator=torch.Generator().manual_seed(seed))
        for layer in block_inputs(model, images)
    ]
