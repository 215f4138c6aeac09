"""BPT: bilinear prompt tuning (Wang, Duan, Kong, "Attention to the Burstiness in Visual Prompt Tuning!",
ICCV 2025), from docs/methods.md, BPT (official code WangYZ1608/BPT, MIT; none of it is copied).

Each prompted layer's prompts are a product ``P_l = A_l B_l^T`` of codes A_l (N x C) and a basis B_l (D x C),
C < D. The basis starts as C columns of the whitening matrix W_l = Sigma_l^(-1/2) of the data a prompt meets
in block l's attention, ``Wq Wk^T Xbar^T``: the frozen query and key weights and the task's mean patch tokens
entering block l, with ``Sigma_l = (Wq Wk^T Xbar^T)(Wq Wk^T Xbar^T)^T / D``. A basis so drawn whitens that
data: ``B^T Sigma B = I_C``. Shallow prompts have one layer; deep ones every block (or ``deep_layers``), where
only the last ``trained_bases`` bases train and the others stay at their whitening, as the official deep
scripts train ``conv1x1.8``-``11`` of 12. Trainable for ViT-B/16, 100 classes, shallow (N = 100, C = 75):
7,500 + 57,600 + 76,900 = 142,000.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from selfprompt.backbones import attention_family
from selfprompt.init.collect import block_inputs, image_batches
from selfprompt.methods.prompt import PromptedViT, PromptedViTConfig, PromptSettings, with_prompt_count
from selfprompt.methods.prompt_tools import check_attention
from selfprompt.methods.registry import Method, Search, register_method, register_settings
from selfprompt.methods.settings import adapter_config, is_integer, number_problem, settings_from

import torch
from torch import nn

#: The official scripts' C ("channels"): 75 with 100 shallow prompts, 50 with 50 deep ones (README, script/).
DEFAULT_RANK = {False: 75, True: 50}
#: The official deep scripts' prompt count (README: "num_prompts is 100 for shallow, and 50 for deep").
DEFAULT_PROMPTS = {False: 100, True: 50}
CODE_STD = 0.02  # the codes' normal draw, the official ``random_vectors`` init


@dataclass
class BPTSettings:
    """BPT's own settings (the prompts' count, dropout and ``deep_layers`` are the ``prompt`` section's).

    Attributes:
        deep: Prompts before every block (BPT-deep) instead of once before block 0 (shallow, the default: the
            README's first recipe).
        rank: C, the width of codes and bases; None is the official 75 (shallow) or 50 (deep), capped at the
            embedding width D.
        trained_bases: The bases of the last k prompted layers train, the others stay at their whitening
            (official deep scripts: the last 4 of 12; the one shallow basis trains).
        whitening: Bases start from the whitening matrix (True; official MAE models and every deep one) or
            from a xavier-uniform draw (False: the official MoCo / supervised shallow default).
        eps: Eigenvalues of Sigma below eps times the largest are raised to it before the inverse square root
            (ours: Sigma has rank at most the number of patches, 196 < 768 on ViT-B/16).
    """

    deep: bool = False
    rank: int | None = None
    trained_bases: int = 4
    whitening: bool = True
    eps: float = 1e-6

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        out = []
        if not isinstance(self.deep, bool):
            out.append(f"deep must be true or false, got {self.deep!r}")
        if self.rank is not None and not (is_integer(self.rank) and self.rank >= 1):
            out.append(f"rank must be an integer >= 1 or null (the official width), got {self.rank!r}")
        if not (is_integer(self.trained_bases) and self.trained_bases >= 0):
            out.append(f"trained_bases must be an integer >= 0, got {self.trained_bases!r}")
        if not isinstance(self.whitening, bool):
            out.append(f"whitening must be true or false, got {self.whitening!r}")
        return out + number_problem("eps", self.eps, 0, 1, "in [0, 1)")


#: What a BPT adapter stores: PromptedViTConfig's fields plus BPTSettings' (rank resolved).
BPTConfig = adapter_config(BPTSettings, PromptedViTConfig)


def attention_matrix(block: nn.Module) -> torch.Tensor:
    """``Wq Wk^T`` (D x D, float64) of ``block``'s attention in row form (``q = x Wq + b_q``), through the
    backbone family's projection (fused or separate q/k/v; biases left out): ``x Wq Wk^T y^T`` is the
    unscaled attention logit of query token x and key token y, summed over heads."""
    attn = check_attention(block.attn, "BPT")
    family = attention_family(attn)
    reference = next(attn.parameters())
    # through 1024 * I: the bias then rounds away against 1024 * W (as VIPAMIN's value map)
    eye = torch.eye(reference.shape[-1], device=reference.device, dtype=reference.dtype) * 1024.0
    zero = torch.zeros_like(eye[:1])
    with torch.no_grad():
        wq, wk = (family.project(attn, eye, p) - family.project(attn, zero, p) for p in (0, 1))
    return (wq.double() @ wk.double().T).cpu() / 1024.0**2


@torch.no_grad()
def mean_patch_tokens(
    backbone: nn.Module,
    loader: Iterable,
    num_layers: int,
    *,
    fraction: float | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per block 0 .. num_layers-1: the patch tokens entering it (frozen backbone, no prompts; position
    embedding included), averaged position by position over a seeded subset of the images, (N_p, D)
    float64."""
    generator = torch.Generator().manual_seed(seed)
    reference = next(backbone.parameters())
    sums: list[torch.Tensor] | None = None
    count = 0
    for images in image_batches(loader, fraction, max_images, generator):
        entering = block_inputs(backbone, images.to(reference.device, reference.dtype), num_layers)
        batch = [b.tokens[:, b.prefix :].double().sum(0).cpu() for b in entering]
        if sums is not None and batch[0].shape != sums[0].shape:
            raise ValueError("BPT averages patch tokens position by position; use one image size.")
        sums = batch if sums is None else [s + b for s, b in zip(sums, batch, strict=True)]
        count += len(images)
    if sums is None:
        raise ValueError("BPT's whitening reads the task's training images, and the loader yielded none.")
    return [s / count for s in sums]


def whitening_statistic(block: nn.Module, mean_tokens: torch.Tensor) -> torch.Tensor:
    """Sigma = (Wq Wk^T Xbar^T)(Wq Wk^T Xbar^T)^T / D (D x D, float64), the official normalisation."""
    data = attention_matrix(block) @ mean_tokens.T.to(torch.float64)  # (D, N_p)
    return data @ data.T / data.shape[0]


def whitening_matrix(sigma: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``Sigma^(-1/2)`` (symmetric, ZCA) of a symmetric positive semi-definite ``sigma``: ``W Sigma W = I``
    when no eigenvalue lies below ``eps`` times the largest; those that do are raised to that floor."""
    values, vectors = torch.linalg.eigh(sigma.to(torch.float64))
    floor = eps * values.max().clamp_min(0)
    values = values.clamp_min(floor) if eps > 0 else values
    if values.min() <= 0:
        raise ValueError(
            "BPT's whitening statistic is singular (an eigenvalue <= 0): raise bpt.eps, or use more images."
        )
    return (vectors * values.rsqrt()) @ vectors.T


class BPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with bilinear prompts ``P_l = A_l B_l^T`` (shallow or deep).
    Args: as :class:`PromptedViT` (its :class:`PromptSettings` as ``prompt``) plus its :class:`BPTSettings`
    (``settings``); ``fields`` by name go to either. The codes are drawn N(0, 0.02^2); the bases start
    xavier-uniform until :meth:`whiten` sets them from the task's images."""

    config_class = BPTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": DEFAULT_PROMPTS[False]}
    needs = frozenset({"prompts", "attention"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: BPTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        **fields: Any,
    ) -> None:
        settings = settings_from("bpt", BPTSettings, settings, fields)
        if prompt is None and "num_prompts" not in fields:
            fields["num_prompts"] = DEFAULT_PROMPTS[settings.deep]
        super().__init__(backbone, num_classes, prompt, deep=settings.deep, **fields)
        del self.prompts  # the prompts are the product of codes and bases
        for block in self.backbone.blocks[: self.num_prompt_layers]:
            check_attention(block.attn, "BPT")
        dim, layers = self.embed_dim, self.num_prompt_layers
        rank = min(DEFAULT_RANK[settings.deep], dim) if settings.rank is None else settings.rank
        if rank > dim:
            raise ValueError(f"bpt.rank must be at most the embedding width {dim}, got {rank}.")
        trained = min(settings.trained_bases, layers)
        for name, value in dataclasses.asdict(settings).items():
            setattr(self.config, name, value)
        self.config.rank = self.rank = rank
        self.num_frozen_bases = layers - trained
        device = next(backbone.parameters()).device
        self.codes = nn.Parameter(torch.randn(layers, self.num_prompts, rank, device=device) * CODE_STD)
        bound = math.sqrt(6.0 / (dim + rank))  # xavier-uniform of a D x C basis
        bases = (torch.rand(layers, dim, rank, device=device) * 2 - 1) * bound
        self.bases = nn.Parameter(bases[self.num_frozen_bases :].clone())
        if self.num_frozen_bases:
            self.frozen_bases = nn.Parameter(bases[: self.num_frozen_bases].clone(), requires_grad=False)

    def basis(self, layer: int) -> torch.Tensor:
        """B_l, (D, C)."""
        frozen = self.num_frozen_bases
        return self.frozen_bases[layer] if layer < frozen else self.bases[layer - frozen]

    def layer_prompts(self, layer: int) -> torch.Tensor:
        """P_l = A_l B_l^T, (N, D)."""
        return self.codes[layer] @ self.basis(layer).T

    def _layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.layer_prompts(layer).expand(batch, -1, -1))

    @torch.no_grad()
    def whiten(
        self,
        loader: Iterable,
        *,
        fraction: float | None = None,
        max_images: int | None = None,
        seed: int = 0,
    ) -> list[torch.Tensor]:
        """Set every basis to C columns (drawn without replacement, seeded) of its layer's whitening matrix
        from ``loader``'s images; returns the layers' Sigma."""
        means = mean_patch_tokens(
            self.backbone, loader, self.num_prompt_layers, fraction=fraction, max_images=max_images, seed=seed
        )
        generator = torch.Generator().manual_seed(seed)
        sigmas = []
        for layer, mean in enumerate(means):
            sigma = whitening_statistic(self.backbone.blocks[layer], mean)
            columns = torch.randperm(self.embed_dim, generator=generator)[: self.rank]
            basis = self.basis(layer)
            basis.copy_(whitening_matrix(sigma, self.config.eps)[:, columns].to(basis.dtype))
            sigmas.append(sigma)
        if not all(torch.isfinite(self.basis(i)).all() for i in range(self.num_prompt_layers)):
            raise ValueError("BPT's whitening gave non-finite bases; raise bpt.eps.")
        return sigmas

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: codes, bases (the frozen ones too: they hold the task's whitening) and head."""
        frozen = {"frozen_bases": self.frozen_bases} if self.num_frozen_bases else {}
        return {
            "codes": self.codes,
            "bases": self.bases,
            **frozen,
            **super(PromptedViT, self).adapter_parameters(),
        }

    def num_adapter_parameters(self) -> int:
        """What trains: the adapter less the frozen bases."""
        return sum(p.numel() for p in self.adapter_parameters().values() if p.requires_grad)


register_settings("bpt", BPTSettings, "BPT's bilinear prompts (with the prompt section).")


def _check(settings: Any, cfg: Any) -> None:
    if settings.file is not None:
        raise ValueError(
            "bpt builds its prompts as codes x bases, which a prompts file (prompt.file) does not hold; drop "
            "prompt.file."
        )
    if settings.deep_layers is not None and not settings.bpt.deep:
        raise ValueError("prompt.deep_layers applies to deep prompts; set bpt.deep true or drop it.")


def prepare(method: Method, model: BPT, settings: Any, loader: Iterable, seed: int) -> None:
    """The bases from the whitening of the task's images (``bpt.whitening``), over ``prompt.init_fraction`` /
    ``init_max_images`` of them; the codes keep their random draw."""
    method.initializer(settings.init)  # only its default: the random codes
    if settings.bpt.whitening:
        model.whiten(loader, fraction=settings.init_fraction, max_images=settings.init_max_images, seed=seed)


def _build(backbone, num_classes, settings: Any, **common: Any) -> BPT:
    prompt = with_prompt_count(settings, DEFAULT_PROMPTS[settings.bpt.deep])
    return BPT(backbone, num_classes, settings.bpt, prompt=prompt, **common)


register_method(
    "bpt",
    "BPT: prompts as codes x bases, the bases from the whitening of Wq Wk^T and the task's patch tokens",
    BPT,
    _build,
    settings="prompt",
    extra_settings=("bpt",),
    check=_check,
    default_init="xavier",
    inits=("xavier",),
    other_inits="spt-shallow or spt-deep",
    prepare=prepare,
    order=25,
    search=Search(
        {"optim.lr": [1e-1, 5e-2, 1e-2, 5e-3], "optim.weight_decay": [5e-3, 1e-3]},
        "lr: the official scripts' 1e-1 (MAE Flowers), 5e-2 (MAE, MoCo), 1e-2 and 5e-3 (supervised); "
        "weight_decay: their 5e-3 (MAE) and 1e-3 (MoCo Flowers, NABirds) (docs/methods.md, BPT)",
    ),
)
