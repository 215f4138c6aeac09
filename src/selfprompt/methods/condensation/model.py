"""Prompt Condensation (Kim et al., arXiv 2305.17223): keep the prompts that matter, fine-tune only those.

Three steps (docs/methods.md, Prompt Condensation; no official code exists, so the choices below are ours):

1. Train ``vpt-deep`` (or ``spt-deep``: SPT's initialisation enters here) with the full prompt budget.
2. ``selfprompt condense RUN --keep 0.3``: score every prompt of every layer on the run's training images,
   :func:`prompt_importance`, rank them globally across layers and keep the best share, :func:`condense`.
   The kept prompts and the trained head become a :class:`CondensedViT` adapter.
3. Method ``pc`` (``--condense.adapter DIR``) fine-tunes the kept prompts and the head.

Choices: the score of prompt p is ``sum over batches |<dL/dp, p>|``, the first-order change of the loss
when p is zeroed, in eval mode (no prompt dropout) with the mean cross-entropy of each batch; ties keep the
earlier layer, then the earlier index; at least one prompt survives; a layer may keep none (deep prompts
replace the previous layer's, so each layer's count is free). The kept prompts keep their trained values
and their order within a layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from selfprompt.methods.prompt import PromptedViT
from selfprompt.methods.prompt_tools import prompt_saliency, refuse_trainval_source
from selfprompt.methods.registry import register_settings
from selfprompt.methods.settings import check_settings, number_problem
from selfprompt.model import ClassifierConfig, PoolType, ViTClassifier

import torch
from torch import nn
from torch.utils.data import DataLoader

RECORD = "condensation.json"  # beside a condensed adapter: its source, the scores and what was kept


@dataclass
class CondensedViTConfig(ClassifierConfig):
    """A ClassifierConfig plus the kept prompts' layout.

    Attributes:
        layer_counts: Prompts kept at each prompted layer (layer 0 first; a shallow source has one layer).
        dropout: Dropout on the prompt tokens while training (the source's).
    """

    layer_counts: list[int] = field(default_factory=lambda: [1])
    dropout: float = 0.0

    renamed_fields: ClassVar[dict[str, str]] = {"prompt_dropout": "dropout"}

    def problems(self) -> list[str]:
        return number_problem("dropout", self.dropout, 0, 1, "in [0, 1)")


class CondensedViT(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with a different number of prompts at each prompted layer.

    Layout entering block l: ``[prefix ; layer_counts[l] prompts ; patches]``: as VPT-deep, each prompted
    layer replaces the previous layer's prompt outputs by its own; after the last prompted layer its prompts
    travel on. ``prompts`` holds the kept prompts of all layers, layer by layer: ``(sum(layer_counts), D)``.
    """

    config_class = CondensedViTConfig
    needs = frozenset({"prompts"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layer_counts: list[int],
        pool: PoolType | None = None,
        dropout: float = 0.0,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
    ) -> None:
        counts = list(layer_counts)
        depth = len(getattr(backbone, "blocks", ()))
        if (
            not counts
            or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts)
            or sum(counts) < 1
        ):
            raise ValueError(f"layer_counts must be integers >= 0 with at least one prompt, got {counts!r}.")
        if len(counts) > depth:
            raise ValueError(f"layer_counts names {len(counts)} layers; the backbone has {depth} blocks.")
        check_settings("condensed", CondensedViTConfig(1, dropout=dropout))
        super().__init__(
            backbone,
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            train_backbone=train_backbone,
            backbone_name=backbone_name,
            layer_counts=counts,
            dropout=dropout,
        )
        self.offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        self.num_extra_tokens = counts[-1]
        device = next(backbone.parameters()).device
        self.prompts = nn.Parameter(torch.zeros(sum(counts), self.embed_dim, device=device))
        self.prompt_dropout = nn.Dropout(dropout)

    @property
    def layer_counts(self) -> list[int]:
        """Prompts kept at each prompted layer (the config's record)."""
        return self.config.layer_counts

    def layer_prompts(self, layer: int) -> torch.Tensor:
        """The kept prompts of one layer, ``(layer_counts[layer], D)``."""
        return self.prompts[self.offsets[layer] : self.offsets[layer + 1]]

    def _insert(self, x: torch.Tensor, layer: int, drop: int) -> torch.Tensor:
        p = self.num_prefix_tokens
        prompts = self.prompt_dropout(self.layer_prompts(layer).expand(x.shape[0], -1, -1))
        return torch.cat([x[:, :p], prompts, x[:, p + drop :]], dim=1)

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._insert(x, 0, 0)

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if 0 < index < len(self.layer_counts):
            x = self._insert(x, index, self.layer_counts[index - 1])
        return self.run_block(index, block, x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"prompts": self.prompts, **super().adapter_parameters()}


def prompt_importance(model: PromptedViT, loader: DataLoader, max_batches: int | None = None) -> torch.Tensor:
    """Each prompt's score ``sum over batches |<dL/dp, p>|``, ``(layers, M)``: the first-order change of the
    mean cross-entropy when the prompt is zeroed, computed in eval mode on ``loader``'s (images, labels)."""
    scores = torch.zeros(model.prompts.shape[:2], dtype=torch.float64)
    for saliency in prompt_saliency(model, loader, max_batches):
        scores += saliency.sum(-1).abs().double().cpu()
    return scores


def check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ValueError(f"keep must be the share of prompts to keep, in (0, 1] (e.g. 0.3), got {keep!r}.")


def kept_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The prompts to keep, ``(layers, M)`` booleans: the ``round(keep * layers * M)`` best scores across
    all layers (at least one); ties keep the earlier layer, then the earlier index."""
    check_keep(keep)
    flat = scores.flatten()
    count = max(1, math.floor(keep * flat.numel() + 0.5))
    order = torch.sort(-flat, stable=True).indices[:count]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


@torch.no_grad()
def condense(model: PromptedViT, mask: torch.Tensor) -> CondensedViT:
    """A :class:`CondensedViT` on ``model``'s backbone with the prompts ``mask`` keeps, and its head."""
    if not isinstance(model, PromptedViT):
        raise TypeError(
            f"Prompt Condensation condenses a vpt-*/spt-* model (PromptedViT), got {type(model).__name__}."
        )
    if mask.shape != model.prompts.shape[:2]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} for prompts {tuple(model.prompts.shape[:2])}.")
    cfg = model.config
    out = CondensedViT(
        model.backbone,
        cfg.num_classes,
        mask.sum(1).tolist(),
        pool=cfg.pool,
        dropout=cfg.dropout,
        head_init_std=cfg.head_init_std,
        backbone_name=model.backbone_name,
    )
    out.prompts.copy_(model.prompts[mask.to(model.prompts.device)])
    out.head.load_state_dict(model.head.state_dict())
    return out


def condense_at_random(model: PromptedViT, keep: float = 0.3, seed: int = 0) -> CondensedViT:
    """``model`` condensed to ``keep`` by random scores: a pc model's shape and cost without a trained run
    (parameter counts, timing)."""
    scores = torch.rand(model.prompts.shape[:2], generator=torch.Generator().manual_seed(seed))
    return condense(model, kept_mask(scores, keep))


@dataclass
class CondensedViTSettings:
    """Prompt Condensation's fine-tuning stage.

    Attributes:
        adapter: The condensed adapter written by ``selfprompt condense`` (prompts, layout and head).
    """

    adapter: str | None = None

    def problems(self) -> list[str]:
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            return [f"adapter must be a folder written by selfprompt condense, got {self.adapter!r}"]
        return []


register_settings(
    "condense", CondensedViTSettings, "Prompt Condensation (pc): the condensed adapter to fine-tune."
)


def _build(
    backbone: nn.Module, num_classes: int, settings: CondensedViTSettings, **common: Any
) -> CondensedViT:
    if settings.adapter is None:
        raise ValueError(
            "method pc fine-tunes a condensed adapter: train vpt-deep or spt-deep, run selfprompt condense "
            "RUN --keep 0.3 --output DIR, then pass --condense.adapter DIR."
        )
    model = CondensedViT.from_pretrained(settings.adapter, backbone, common["backbone_name"])
    wanted = {"num_classes": num_classes, "pool": common["pool"]}
    saved = {"num_classes": model.config.num_classes, "pool": model.config.pool}
    if saved != wanted:
        raise ValueError(
            f"{settings.adapter} was condensed from a model with {saved}; this run has {wanted}: condense a "
            f"run of the same task with the same model.pool."
        )
    return model


def _check(settings: CondensedViTSettings, cfg: Any) -> None:
    if cfg.track.every:
        raise ValueError(
            "track.every: pc's prompt count differs per layer, which tracking does not read; set 0."
        )
    record = Path(settings.adapter or "") / RECORD
    if record.is_file():
        refuse_trainval_source(json.loads(record.read_text()), cfg, settings.adapter)
