"""IPT: instance-wise prompts, written from docs/methods.md, IPT (Instance-wise Prompt Tuning, arXiv
2206.01958, official code IPT-Prompttuning/IPT, no licence file; instance-aware prompt learning, Jin et al.,
arXiv 2201.07126; none of their code is copied).

Every image gets prompts of its own at each prompted layer l, built from its patch tokens entering block l
(the sequence after the position embedding and ``norm_pre`` for l = 0, block l's input for l > 0), in one of
two forms (``ipt.form``):

``relevance`` (Jin et al.): M shared prompts P_l; q = w_l * mean(patch tokens) (w_l: a learned vector per
layer), s_i = q . p_i / sqrt(D), and the image's prompts are ``M * softmax(s)_i * p_i``: with equal relevance
(w_l = 0, the start) every weight is M * (1/M) = 1 and IPT is VPT with prompts P. Differentiable throughout.
Trainable: L * M * D + L * D + head (M = 10 on ViT-B/16, 100 classes: 178,276).

``vocabulary`` (IPT's prompts looked up from the input): K prototypes V_l per layer. Each patch token is
assigned its nearest prototype (Euclidean); the image's M prompts are the M prototypes with the most tokens
assigned, ties (zero counts included) by the distance from the prototype to its nearest token of the image,
then by index, in that order, each refined as ``v + up(GELU(down(v)))`` (one MLP for every layer, ``up``
zero-initialised, so it starts as the plain prototypes). The choice is not differentiated (argmin/top-k
under no_grad); the gradient reaches the chosen prototypes' rows and the MLP. Trainable: L * K * D +
2 * D * r + r + D + head (K = 64, r = 64: 765,860).

SPT initialisation (docs/methods.md, SPT): relevance prompts exactly as spt-deep's; the vocabulary from the
tokens it is compared with (block l's input, patch tokens), K prototypes per layer (k-means by default).
Shallow is ``prompt.deep_layers: 1``: one prompt set before block 0, which then travels through every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from selfprompt.methods import prompt
from selfprompt.methods.prompt import (
    MAX_PROMPTS,
    PROMPT_SEARCH,
    PromptedViT,
    PromptedViTConfig,
    PromptRunSettings,
    PromptSettings,
    with_prompt_count,
)
from selfprompt.methods.prompt_tools import PromptPart, as_grid, frozen_layers, refuse_block_initializer
from selfprompt.methods.registry import Method, register_method, register_settings
from selfprompt.methods.settings import adapter_config, is_integer, positive_int, settings_from

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

FORMS = ("relevance", "vocabulary")


@dataclass
class IPTSettings:
    """IPT's own settings (the prompts' count M, init, dropout and deep layers are the ``prompt`` section's).

    Attributes:
        form: ``relevance``: M shared prompts re-weighted per image; ``vocabulary``: each image's M prompts
            picked from K prototypes by its patch tokens.
        vocabulary_size: K, prototypes per prompted layer (vocabulary form; at least M).
        hidden: Hidden width r of the refining MLP (vocabulary form).
    """

    form: str = "relevance"
    vocabulary_size: int = 64
    hidden: int = 64

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        out = []
        if self.form not in FORMS:
            out.append(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        k = self.vocabulary_size
        if not (is_integer(k) and 1 <= k <= MAX_PROMPTS):
            out.append(f"vocabulary_size must be an integer in 1..{MAX_PROMPTS}, got {k!r}")
        if not positive_int(self.hidden):
            out.append(f"hidden must be an integer >= 1, got {self.hidden!r}")
        return out


#: What an IPT adapter stores: PromptedViTConfig's fields plus IPTSettings'.
IPTConfig = adapter_config(IPTSettings, PromptedViTConfig)


def _vocabulary_too_small(k: int, m: int) -> str:
    return f"ipt.vocabulary_size ({k}) must be at least prompt.num_prompts ({m}): each image picks M of K."


@torch.no_grad()
def choose_prototypes(tokens: torch.Tensor, vocabulary: torch.Tensor, count: int) -> torch.Tensor:
    """The indices ``(B, count)`` of the prototypes each image's patch tokens ``(B, N, D)`` pick from
    ``vocabulary`` ``(K, D)``: by the number of tokens whose nearest prototype each is (most first), ties by
    the distance from the prototype to the image's nearest token (closest first), then by index."""
    k = vocabulary.shape[0]
    distance = torch.cdist(tokens.float(), vocabulary.float()[None])  # (B, N, K)
    index = torch.arange(k, device=tokens.device)
    counts = (distance.argmin(dim=2)[..., None] == index).sum(dim=1)  # (B, K)
    closest = distance.min(dim=1).values  # (B, K)
    # each prototype's place by distance, ties by index: how many come before it (0 .. K-1, all distinct)
    ahead, level = closest[:, None, :] < closest[:, :, None], closest[:, None, :] == closest[:, :, None]
    place = (ahead | (level & (index[None, :] < index[:, None]))).sum(dim=2)
    # one distinct key per prototype, so the top ``count`` are one order (no sort ties; ONNX's TopK)
    return (counts * k + (k - 1 - place)).topk(count, dim=1).indices


class IPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with prompts of each image's own (the module docstring). Args: as
    :class:`PromptedViT` (its :class:`PromptSettings` as ``prompt``; deep by default) plus its
    :class:`IPTSettings` (``settings``); ``fields`` by name go to either.

    ``prompts`` holds P (L, M, D) in the relevance form and the vocabulary V (L, K, D) in the other, which
    its method's ``prepare`` initialises (``selfprompt.get_model(..., init_data=loader)``, ``selfprompt
    train``); ``selfprompt.init_prompts(model, ...)`` fills M rows per layer, the relevance form's."""

    config_class = IPTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 10, "dropout": 0.1}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: IPTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        deep: bool = True,
        **fields: Any,
    ) -> None:
        settings = settings_from("ipt", IPTSettings, settings, fields)
        super().__init__(backbone, num_classes, prompt, deep=deep, **fields)
        for name in ("form", "vocabulary_size", "hidden"):
            setattr(self.config, name, getattr(settings, name))
        self.form = settings.form
        layers, dim, device = self.num_prompt_layers, self.embed_dim, self.prompts.device
        if self.form == "relevance":
            self.query = nn.Parameter(torch.zeros(layers, dim, device=device))
            return
        if settings.vocabulary_size < self.num_prompts:
            raise ValueError(_vocabulary_too_small(settings.vocabulary_size, self.num_prompts))
        self.vocabulary_size = settings.vocabulary_size
        self.prompts = nn.Parameter(torch.empty(layers, self.vocabulary_size, dim, device=device))
        self.reset_prompts()
        self.refine_down = nn.Linear(dim, settings.hidden, device=device)
        self.refine_up = nn.Linear(settings.hidden, dim, device=device)
        nn.init.zeros_(self.refine_up.weight)
        nn.init.zeros_(self.refine_up.bias)

    def instance_prompts(self, layer: int, patches: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s prompts ``(B, M, D)`` for the images whose patch tokens entering it are
        ``patches`` ``(B, N, D)`` (before prompt dropout)."""
        table = self.prompts[layer]
        if self.form == "relevance":
            query = patches.mean(dim=1) * self.query[layer]
            weights = torch.softmax(query @ table.T / math.sqrt(self.embed_dim), dim=-1)
            return (self.num_prompts * weights).unsqueeze(-1) * table
        chosen = table[choose_prototypes(patches, table.detach(), self.num_prompts)]
        return chosen + self.refine_up(F.gelu(self.refine_down(chosen)))

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Layer 0's prompts, from the patch tokens as they will enter block 0, between prefix and patches."""
        p = self.num_prefix_tokens
        patches = self.family.pre_blocks(self.backbone, x[:, p:])
        prompts = self.prompt_dropout(self.instance_prompts(0, patches)).to(x.dtype)
        return torch.cat([x[:, :p], prompts, x[:, p:]], dim=1)

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Deep layers: the previous block's prompt outputs replaced by prompts from the patches entering."""
        if 0 < index < self.num_prompt_layers:
            p, m = self.num_prefix_tokens, self.num_prompts
            prompts = self.prompt_dropout(self.instance_prompts(index, x[:, p + m :])).to(x.dtype)
            x = torch.cat([x[:, :p], prompts, x[:, p + m :]], dim=1)
        return self.run_block(index, block, x)

    @torch.no_grad()
    def vocabulary_tokens_by_layer(self, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """What the vocabulary of layer l is built from: the patch tokens entering block l, as it is read."""
        layers = frozen_layers(self.backbone, images, num_layers)
        return [as_grid(x, grid, self.num_prefix_tokens) for grid, _, x in layers]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: prompts (the vocabulary), the query (relevance) or the MLP (vocabulary), head."""
        if self.form == "relevance":
            return {"query": self.query, **super().adapter_parameters()}
        down, up = self.refine_down, self.refine_up
        mlp = {"refine_down.weight": down.weight, "refine_down.bias": down.bias}
        mlp |= {"refine_up.weight": up.weight, "refine_up.bias": up.bias}
        return {**mlp, **super().adapter_parameters()}


register_settings("ipt", IPTSettings, "IPT's form, vocabulary and MLP (with the prompt section).")


def _check(settings: Any, cfg: Any) -> None:
    if settings.ipt.form != "vocabulary":
        return
    m = with_prompt_count(settings, 10).num_prompts
    if settings.ipt.vocabulary_size < m:
        raise ValueError(_vocabulary_too_small(settings.ipt.vocabulary_size, m))
    refuse_block_initializer(settings, "ipt.form vocabulary", "the vocabulary holds patch-token prototypes")


def prepare(method: Method, model: IPT, settings: PromptRunSettings, loader: DataLoader, seed: int) -> None:
    """Relevance, or a prompts file: as :func:`selfprompt.methods.prompt.prepare`. Vocabulary: K prototypes
    per layer from the initializer over the patch tokens entering each prompted block."""
    if model.form == "relevance" or settings.file is not None:
        prompt.prepare(method, model, settings, loader, seed)
        return
    view = PromptPart(
        model,
        model.vocabulary_size,
        model.num_prompt_layers,
        tokens_by_layer=model.vocabulary_tokens_by_layer,
    )
    values = prompt.initial_prompts(view, loader, method.initializer(settings.init), settings, seed)
    with torch.no_grad():
        model.prompts.copy_(values)


def _build(backbone, num_classes, settings: Any, **common: Any) -> IPT:
    return IPT(backbone, num_classes, settings.ipt, prompt=with_prompt_count(settings, 10), **common)


register_method(
    "ipt",
    "IPT: instance-wise prompts, shared prompts re-weighted per image or picked from a prototype vocabulary",
    IPT,
    _build,
    settings="prompt",
    extra_settings=("ipt",),
    check=_check,
    default_init="kmeans",
    prepare=prepare,
    search=PROMPT_SEARCH,
    order=26,
)
