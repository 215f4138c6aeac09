"""E2VPT: effective and efficient visual prompt tuning (Han et al., ICCV 2023), written from
docs/methods.md, E2VPT (official code ChengHan111/E2VPT, CC BY-NC 4.0; none of it is copied).

(a) Visual prompts: VPT-deep, N_P per block after the prefix tokens (replaced before every block), dropout.
(b) Key-value prompts: in every block, after the qkv projection, the head split and any q/k norm, L_kv
    per-head prompts are prepended to the keys and the values: K' = [P_k ; K], V' = [P_v ; V]. Queries and the
    output length are unchanged; the prompts bypass LN1 and W_k / W_v. By default (``share_kv``, the official
    SHARE_PARAM_KV) one tensor per block serves as both P_k and P_v; init kaiming-uniform (bound
    sqrt(6 / (L_kv * d_h))), no dropout.
Trainable on ViT-B/16 with 100 classes, N_P=10, L_kv=5: 92,160 + 46,080 + 76,900 = 215,140 (unshared
261,220).
(c) Pruning and rewind, the optional second stage: ``selfprompt prune RUN --output F`` scores a trained
    run's visual prompts (:func:`mask_importance`); a run with ``--e2vpt.pruning F --e2vpt.prune_tokens t
    --e2vpt.prune_segments s`` trains E2VPT again from its initial values with 0/1 masks, frozen, on the
    visual prompts: a token mask (N_P) and a segment mask (N_P x 16, dim d in segment d mod 16), one pair
    shared by every layer (:func:`pruning_masks`). ``selfprompt sweep`` over the two shares picks a pair on
    val, as the official code retrains every candidate pair and keeps the best on val.

Our choices in (c), each where the official code differs: the score of a mask entry is ``sum over batches
|dL/dm|`` at m = 1 (Michel et al. 2019's absolute first-order estimate; the code ranks the signed gradient
ascending, which by first order prunes first the tokens whose removal raises the loss most), computed in
eval mode without optimizer steps (the code steps the optimizer during its scoring pass); the source run
trains no masks (at m = 1 the gradient equals ``sum over layers <dL/dp, p>``, so masks need not exist
while training); a share prunes ``floor(share * count)`` entries at once (the code's cascade over 10..90%
with fixed scores prunes the same entries); the rewind restarts from the seed's initial values, which are
the source's when its seed and ``prompt.init`` match (the code re-draws an unseeded init).

SPT initialisation (docs/methods.md, SPT): the visual prompts exactly as spt-deep; unshared key and value
prompts from prototypes of block i's keys (LN1(x) W_k + b_k after k-norm) and values of the frozen backbone
without prompts, each prototype a whole token's key (all heads), then split into heads. A shared K=V tensor
cannot sit in both spaces, so a token initializer needs ``e2vpt.share_kv false``. VIPAMIN initialises the
visual prompts only (it defines prompt tokens entering a block); the key-value prompts keep their draw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from selfprompt.init.registry import get_initializer
from selfprompt.methods import prompt
from selfprompt.methods.prompt import (
    PromptedViT,
    PromptedViTConfig,
    PromptRunSettings,
    PromptSettings,
    with_prompt_count,
)
from selfprompt.methods.prompt_tools import (
    PromptPart,
    as_grid,
    check_attention,
    frozen_layers,
    prompt_saliency,
    refuse_tracking,
    refuse_trainval_source,
    self_attention,
)
from selfprompt.methods.registry import Method, register_settings
from selfprompt.methods.settings import adapter_config, positive_int, settings_from

import torch
from torch import nn
from torch.utils.data import DataLoader

SEGMENTS = 16  # official CLS_TOKEN_P_PIECES_NUM: each visual prompt's dims in 16 strided segments
MIN_SEGMENTS = 4  # official MIN_NUMBER_CLS_TOKEN_PIECE: segments every kept token keeps


@dataclass
class E2VPTSettings:
    """E2VPT's own model settings (the visual prompts' are :class:`PromptSettings`).

    Attributes:
        kv_length: Key-value prompts per block (L_kv; official VTAB runs 1-10); 0 turns them off.
        share_kv: One tensor as both key and value prompts (the official default); set false for SPT inits.
    """

    kv_length: int = 5
    share_kv: bool = True

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        if positive_int(self.kv_length, 0):
            return []
        return [f"kv_length must be an integer >= 0 (0: no key-value prompts), got {self.kv_length!r}"]


@dataclass
class E2VPTRunSettings(E2VPTSettings):
    """The ``e2vpt`` recipe section: :class:`E2VPTSettings` plus the pruning a rewound run reads (its masks,
    not these fields, are what the adapter stores).

    Attributes:
        pruning: The scores ``selfprompt prune RUN --output FILE`` wrote from a trained e2vpt run: this run
            retrains from its initial values with the visual prompts pruned by the two shares below.
        prune_tokens: Share of the visual prompt tokens pruned (official candidates 0.1-0.9; one is kept).
        prune_segments: Share of each token's 16 segments pruned (official 0.1-0.9; 4 are kept).
    """

    pruning: str | None = None
    prune_tokens: float = 0.0
    prune_segments: float = 0.0

    def problems(self) -> list[str]:
        out = super().problems()
        shares = [_share_problem(name, getattr(self, name)) for name in ("prune_tokens", "prune_segments")]
        out += [problem for problem in shares if problem]
        if self.pruning is None and (self.prune_tokens or self.prune_segments):
            out.append(
                "prune_tokens and prune_segments need pruning: the file selfprompt prune RUN --output FILE "
                "writes from a trained e2vpt run"
            )
        if self.pruning is not None and not Path(self.pruning).is_file():
            out.append(f"pruning must be a file written by selfprompt prune, got {self.pruning!r}")
        return out


#: What an E2VPT adapter stores: PromptedViTConfig's fields (deep), E2VPTSettings' and the pruning masks:
#: ``token_mask`` 0/1 per visual prompt (N_P) and ``segment_mask`` per visual prompt and segment (N_P x 16),
#: None without pruning.
E2VPTConfig = adapter_config(
    E2VPTSettings,
    PromptedViTConfig,
    extra=[("token_mask", list[int] | None, None), ("segment_mask", list[list[int]] | None, None)],
)


def _check_masks(token_mask: Any, segment_mask: Any, num_prompts: int) -> torch.Tensor | None:
    """The (N_P, 16) 0/1 keep-mask of both masks, or None without them."""
    if token_mask is None and segment_mask is None:
        return None
    try:
        tokens = torch.tensor(token_mask, dtype=torch.float32)
        segments = torch.tensor(segment_mask, dtype=torch.float32)
    except (TypeError, ValueError):
        tokens = segments = torch.empty(0)
    if (
        tokens.shape != (num_prompts,)
        or segments.shape != (num_prompts, SEGMENTS)
        or not all(bool(((t == 0) | (t == 1)).all()) for t in (tokens, segments))
        or tokens.sum() < 1
    ):
        raise ValueError(
            f"token_mask and segment_mask must be 0/1 lists of shape ({num_prompts},) and ({num_prompts}, "
            f"{SEGMENTS}) keeping at least one token (pruning_masks makes them), got {token_mask!r} and "
            f"{segment_mask!r}."
        )
    return tokens[:, None] * segments


class E2VPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with VPT-deep visual prompts and key-value prompts in every block.

    Args: as :class:`PromptedViT` (deep; its :class:`PromptSettings` as ``prompt``) plus its
    :class:`E2VPTSettings` (``settings``: ``kv_length`` L_kv >= 0, 0 is VPT-deep, and ``share_kv``; ``fields``
    by name go to either) and the pruning masks (:func:`pruning_masks` makes them).
    """

    config_class = E2VPTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 10, "dropout": 0.1}
    needs = frozenset({"prompts", "attention", "key_value_prompts"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: E2VPTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        deep: bool = True,
        token_mask: list[int] | None = None,
        segment_mask: list[list[int]] | None = None,
        **fields: Any,
    ) -> None:
        if not deep:
            raise ValueError("E2VPT's visual prompts are deep; deep must be True.")
        settings = settings_from("e2vpt", E2VPTSettings, settings, fields)
        super().__init__(backbone, num_classes, prompt, deep=True, **fields)
        keep = _check_masks(token_mask, segment_mask, self.num_prompts)
        kv_length, share_kv = settings.kv_length, settings.share_kv
        self.config.kv_length, self.config.share_kv = kv_length, share_kv
        self.config.token_mask, self.config.segment_mask = token_mask, segment_mask
        self.kv_length, self.share_kv = kv_length, share_kv
        self.prompt_mask: torch.Tensor | None
        if keep is None:
            self.prompt_mask = None
        else:  # (N_P, D): dim d of prompt j kept where token j and its segment d mod 16 are
            dims = torch.arange(self.embed_dim) % SEGMENTS
            self.register_buffer("prompt_mask", keep[:, dims].to(self.prompts.device), persistent=False)
        self.kv_prompts = nn.ParameterDict()
        if kv_length:
            attn = check_attention(self.backbone.blocks[0].attn, "E2VPT")
            for block in self.backbone.blocks:
                check_attention(block.attn, "E2VPT")
            shape = (len(self.backbone.blocks), attn.num_heads, kv_length, attn.head_dim)
            for name in ("kv",) if share_kv else ("key", "value"):
                self.kv_prompts[name] = nn.Parameter(torch.empty(shape, device=self.prompts.device))
            self.reset_kv_prompts()

    def _layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        """The layer's visual prompts with the pruning masks applied (pruned values are zeros; a 0/1 mask
        commutes with dropout)."""
        prompts = super()._layer_prompts(layer, batch)
        return prompts if self.prompt_mask is None else prompts * self.prompt_mask

    def num_adapter_parameters(self) -> int:
        """The adapter's values less the pruned visual prompt values (zeros in the forward, no gradient)."""
        if self.prompt_mask is None:
            return super().num_adapter_parameters()
        pruned = int((self.prompt_mask == 0).sum()) * self.num_prompt_layers
        return super().num_adapter_parameters() - pruned

    def kaiming_bound(self) -> float:
        """The official key-value init: kaiming-uniform with fan_in = L_kv * d_h."""
        return math.sqrt(6.0 / (self.kv_length * self.backbone.blocks[0].attn.head_dim))

    @torch.no_grad()
    def reset_kv_prompts(self, generator: torch.Generator | None = None) -> None:
        bound = self.kaiming_bound()
        for param in self.kv_prompts.values():
            param.copy_(torch.rand(param.shape, generator=generator) * (2 * bound) - bound)

    def _kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.share_kv:
            return self.kv_prompts["kv"][index], self.kv_prompts["kv"][index]
        return self.kv_prompts["key"][index], self.kv_prompts["value"][index]

    def _block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kv = self._kv(index)
        where = self._positions
        return self.block_branches(
            index,
            block,
            x,
            attn=lambda h: self_attention(block.attn, h, kv_prefix=kv, positions=where, index=index),
        )

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block with this layer's key-value prompts (after the deep prompts were placed)."""
        if not self.kv_length:
            return super().run_block(index, block, x)
        return self._block(index, block, x)

    @torch.no_grad()
    def keys_values_by_layer(self, part: int, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """Block i's keys (``part`` 1, after k-norm) or values (2) of the frozen backbone without prompts,
        patch tokens only, heads concatenated: one ``(B, H, W, H_heads * d_h)`` grid per block."""
        grids, family = [], self.family
        for grid, block, x in frozen_layers(self.backbone, images, num_layers):
            attn = block.attn
            heads = family.split_heads(attn, family.project(attn, block.norm1(x)))[part]  # (B, H, N, d_h)
            if part == 1:
                heads = family.norm_qk(attn, heads, heads)[1]
            tokens = family.merge_heads(attn, heads)  # (B, N, H * d_h)
            grids.append(as_grid(tokens, grid, self.num_prefix_tokens))
        return grids

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: visual prompts, key-value prompts and head."""
        kv = {f"kv_prompts.{name}": p for name, p in self.kv_prompts.items()}
        return {**kv, **super().adapter_parameters()}


def mask_importance(
    model: E2VPT, loader: DataLoader, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the token mask ``(N_P,)`` and the segment mask ``(N_P, 16)``: ``sum over batches |dL/dm|``
    at m = 1, each mask entry shared by every layer (eval mode, the mean cross-entropy of each batch)."""
    tokens = torch.zeros(model.num_prompts, dtype=torch.float64)
    segments = torch.zeros(model.num_prompts, SEGMENTS, dtype=torch.float64)
    dims = torch.arange(model.embed_dim) % SEGMENTS
    for saliency in prompt_saliency(model, loader, max_batches):  # dL/dp * p, (layers, N_P, D)
        per_dim = saliency.sum(0).double().cpu()
        tokens += per_dim.sum(-1).abs()
        segments += torch.zeros_like(segments).index_add_(1, dims, per_dim).abs()
    return tokens, segments


def _pruned(scores: torch.Tensor, count: int) -> torch.Tensor:
    """0/1 keeping all but the ``count`` lowest scores along the last dim (ties prune the later index)."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.int64)
    return keep.scatter_(-1, order[..., : scores.shape[-1] - count], 1)


def _share_problem(name: str, share: Any) -> str | None:
    if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 <= share < 1):
        return f"{name} must be the share pruned, in [0, 1), got {share!r}"
    return None


def pruning_masks(
    token_scores: torch.Tensor, segment_scores: torch.Tensor, prune_tokens: float, prune_segments: float
) -> tuple[list[int], list[list[int]]]:
    """The token and segment masks that prune ``floor(share * count)`` of the lowest-scored tokens (at least
    one token kept) and of each token's lowest-scored segments (at least 4 of 16 kept)."""
    for name, share in (("prune_tokens", prune_tokens), ("prune_segments", prune_segments)):
        problem = _share_problem(name, share)
        if problem:
            raise ValueError(f"{problem}.")
    count = token_scores.numel()
    tokens = _pruned(token_scores, min(math.floor(prune_tokens * count), count - 1))
    segments = _pruned(segment_scores, min(math.floor(prune_segments * SEGMENTS), SEGMENTS - MIN_SEGMENTS))
    return tokens.tolist(), segments.tolist()


def read_pruning(path: str | Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The record ``selfprompt prune`` wrote and its token and segment scores, checked."""
    try:
        record = json.loads(Path(path).read_text())
        tokens, segments = torch.tensor(record["token_scores"]), torch.tensor(record["segment_scores"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a pruning record ({error}); write one with selfprompt prune RUN --output FILE."
        ) from None
    if tokens.ndim != 1 or segments.shape != (tokens.numel(), SEGMENTS):
        raise ValueError(f"{path}: scores must be (N_P,) and (N_P, {SEGMENTS}); rerun selfprompt prune.")
    return record, tokens, segments


register_settings("e2vpt", E2VPTRunSettings, "E2VPT's key-value prompts (with the prompt section).")


def _token_init(init: str | None) -> bool:
    """Whether ``init`` builds the key and value prompts from tokens (an initializer that reads whole blocks,
    VIPAMIN, defines visual prompts only: the key-value prompts keep their kaiming draw)."""
    return init is not None and get_initializer(init).needs_tokens and not get_initializer(init).reads_blocks


def _refuse_shared(init: str) -> None:
    raise ValueError(
        f"e2vpt with prompt.init={init!r}: one shared key=value prompt tensor cannot be built from both "
        f"keys and values; set e2vpt.share_kv false (separate key and value prompts)."
    )


def _check(settings: Any, cfg: Any) -> None:
    if settings.e2vpt.kv_length:
        refuse_tracking(cfg, "e2vpt with key-value prompts")
    if settings.e2vpt.share_kv and settings.e2vpt.kv_length and _token_init(settings.init):
        _refuse_shared(settings.init)


def prepare(method: Method, model: E2VPT, settings: PromptRunSettings, loader: DataLoader, seed: int) -> None:
    """Visual prompts as :func:`selfprompt.methods.prompt.prepare`; with a token initializer the key and
    value prompts too, from the keys and values of each block (the kaiming draw otherwise)."""
    init = method.initializer(settings.init)
    if _token_init(init) and model.kv_length and model.share_kv:
        _refuse_shared(init)
    prompt.prepare(method, model, settings, loader, seed)
    if settings.file is not None or not model.kv_length or not _token_init(init):
        return
    attn = model.backbone.blocks[0].attn
    heads, depth = attn.num_heads, len(model.backbone.blocks)
    for part, name in ((1, "key"), (2, "value")):
        view = PromptPart(
            model,
            model.kv_length,
            depth,
            embed_dim=attn.attn_dim,
            tokens_by_layer=partial(model.keys_values_by_layer, part),
        )
        values = prompt.initial_prompts(view, loader, init, settings, seed)  # (L, L_kv, H * d_h)
        values = values.reshape(depth, model.kv_length, heads, -1).transpose(1, 2)
        with torch.no_grad():
            model.kv_prompts[name].copy_(values)


def _resolve(settings: Any, cfg: Any) -> SimpleNamespace:
    """The settings with ``masks``, the ``token_mask`` / ``segment_mask`` arguments from ``e2vpt.pruning``
    and its shares: the record is read once per run."""
    e2vpt = settings.e2vpt
    if e2vpt.pruning is None:
        return SimpleNamespace(**vars(settings), masks={})
    record, token_scores, segment_scores = read_pruning(e2vpt.pruning)
    refuse_trainval_source(record, cfg, e2vpt.pruning)
    scored, num_prompts = token_scores.numel(), with_prompt_count(settings, 10).num_prompts
    if scored != num_prompts:
        raise ValueError(
            f"{e2vpt.pruning} scores {scored} visual prompts and this run has {num_prompts}: set "
            f"prompt.num_prompts {scored} (the source run's) to rewind it."
        )
    tokens, segments = pruning_masks(token_scores, segment_scores, e2vpt.prune_tokens, e2vpt.prune_segments)
    return SimpleNamespace(**vars(settings), masks={"token_mask": tokens, "segment_mask": segments})


def _build(backbone, num_classes, settings: Any, **common: Any) -> E2VPT:
    prompt = with_prompt_count(settings, 10)
    return E2VPT(backbone, num_classes, settings.e2vpt, prompt=prompt, **settings.masks, **common)
