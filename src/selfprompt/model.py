"""ViTClassifier (linear probe, full fine-tuning) and PromptedViT (VPT, SPT) around a timm ViT."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

PoolType = Literal["token", "avg", "mae"]
POOL_TYPES: tuple[str, ...] = ("token", "avg", "mae")


@dataclass
class ClassifierConfig:
    """Everything that defines a ViTClassifier besides its backbone weights.

    Attributes:
        num_classes: Output classes of the new linear head.
        pool: ``token`` (class token), ``avg`` (mean of patch tokens, prompts excluded) or ``mae``
            (official SPT MAE head: mean over prompt and patch outputs, then the backbone's final norm).
            None picks ``token`` when the backbone pools its class token, else ``avg``.
        head_init_std: Std of the truncated-normal head weight init (SPT: 0.02, 0.01 for MoCo v3).
        train_backbone: Fine-tune the backbone too (full fine-tuning) instead of freezing it.
    """

    num_classes: int
    pool: PoolType | None = None
    head_init_std: float = 0.02
    train_backbone: bool = False


@dataclass
class PromptedViTConfig(ClassifierConfig):
    """A ClassifierConfig plus the prompts.

    Attributes:
        num_prompts: Prompt tokens per prompted layer (M).
        deep: Prompts before every block (VPT-deep) instead of once before block 0 (shallow).
        deep_layers: With ``deep``, prompt only the first k blocks (None: all of them).
        prompt_dropout: Dropout on the prompt tokens while training (VPT uses 0.1 for deep).
    """

    num_prompts: int = 10
    deep: bool = False
    deep_layers: int | None = None
    prompt_dropout: float = 0.0


def timm_name(backbone: nn.Module) -> str | None:
    """timm's ``architecture.tag`` name of a backbone, or None for a hand-built one."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return None
    return f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch


def backbone_signature(backbone: VisionTransformer, name: str | None) -> dict[str, Any]:
    """The backbone properties an adapter depends on; saved with it and checked on load."""
    return {
        "name": name,
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks),
        "patch_size": list(backbone.patch_embed.patch_size),
        "num_prefix_tokens": backbone.num_prefix_tokens,
    }


def backbone_pool(backbone: nn.Module) -> PoolType:
    """The head input a backbone pools itself: ``token`` for a class-token backbone, else ``avg``."""
    return "token" if getattr(backbone, "global_pool", None) == "token" else "avg"


def check_backbone(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            f"selfprompt supports timm VisionTransformer backbones (vit_*, deit3_*, ... made by "
            f"timm.create_model), got {type(backbone).__name__}. Hierarchical or convolutional models "
            f"(ResNet, Swin, ConvNeXt, ...) have no token sequence to prompt."
        )


class ViTClassifier(nn.Module):
    """A timm ``VisionTransformer`` with a new linear head: linear probing (frozen backbone, the default) or
    full fine-tuning (``train_backbone=True``).

    A frozen backbone stays in eval mode whatever ``train()`` is called with. Forward matches timm's own
    (``norm``, pooling, ``fc_norm``) with this class's ``pool`` and head.

    Args:
        backbone: A timm ``VisionTransformer`` (any width/depth, class token or not, register tokens,
            ``no_embed_class``, ``dynamic_img_size``). Its own classifier is not used.
        num_classes, pool, head_init_std, train_backbone: See :class:`ClassifierConfig`.
        backbone_name: Name recorded in saved adapters; defaults to timm's ``architecture.tag``.
    """

    config_class: ClassVar[type[ClassifierConfig]] = ClassifierConfig
    num_prompts: int = 0
    num_prompt_layers: int = 0

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **prompt_settings: Any,
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
        if pool is None:
            pool = backbone_pool(backbone)
        if pool not in POOL_TYPES:
            raise ValueError(f"pool must be one of {POOL_TYPES}, got {pool!r}.")
        if pool == "token" and not backbone.has_class_token:
            raise ValueError("pool='token' needs a class token and this backbone has none; use pool='avg'.")
        self.config = self.config_class(
            num_classes=num_classes,
            pool=pool,
            head_init_std=head_init_std,
            train_backbone=train_backbone,
            **prompt_settings,
        )
        self.backbone_name = backbone_name if backbone_name is not None else timm_name(backbone)
        self.backbone = backbone.requires_grad_(train_backbone).train(train_backbone and self.training)
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        device = next(backbone.parameters()).device
        self.head = nn.Linear(backbone.embed_dim, num_classes, device=device)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def train(self, mode: bool = True) -> ViTClassifier:
        super().train(mode)
        if not self.config.train_backbone:
            self.backbone.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence ``[prefix ; prompts ; patches]`` after the last block (before the final norm)."""
        bb = self.backbone
        p, m = self.num_prefix_tokens, self.num_prompts
        x = bb.patch_drop(bb._pos_embed(bb.patch_embed(x)))
        if m:
            x = torch.cat([x[:, :p], self._layer_prompts(0, x.shape[0]), x[:, p:]], dim=1)
        x = bb.norm_pre(x)
        for i, block in enumerate(bb.blocks):
            if 0 < i < self.num_prompt_layers:
                x = torch.cat([x[:, :p], self._layer_prompts(i, x.shape[0]), x[:, p + m :]], dim=1)
            x = block(x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (the head's input) from ``forward_features`` output."""
        bb = self.backbone
        p = self.num_prefix_tokens
        if self.config.pool == "mae":
            return bb.fc_norm(bb.norm(x[:, p:].mean(dim=1)))
        x = bb.norm(x)
        x = x[:, 0] if self.config.pool == "token" else x[:, p + self.num_prompts :].mean(dim=1)
        return bb.fc_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train and that checkpoints hold: the head, plus the backbone if it trains."""
        params = {"head.weight": self.head.weight, "head.bias": self.head.bias}
        if self.config.train_backbone:
            params |= {f"backbone.{k}": v for k, v in self.backbone.named_parameters()}
        return params

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters().values())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter (safetensors) and its JSON config into ``directory``."""
        from selfprompt.checkpoint import save_adapter

        return save_adapter(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: nn.Module, backbone_name: str | None = None
    ) -> ViTClassifier:
        """Rebuild a saved adapter on ``backbone``; refuses a backbone that does not match the saved one."""
        from selfprompt.checkpoint import load_adapter

        return load_adapter(directory, backbone, backbone_name, expected=cls)


class PromptedViT(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with learnable prompt tokens and a new linear head.

    Token layout entering block 0: ``[prefix tokens (cls, registers) ; prompts ; patch tokens]``. Prompts are
    inserted after the position embedding and never receive one. Shallow prompts travel through all blocks;
    deep prompts replace the previous block's prompt outputs before each of the first ``deep_layers`` blocks.
    Only ``prompts`` and ``head`` are trainable; the backbone is frozen and stays in eval mode.

    Args:
        backbone: A timm ``VisionTransformer``; see :class:`ViTClassifier`.
        num_classes, num_prompts, deep, deep_layers, pool, prompt_dropout, head_init_std, train_backbone:
            See :class:`PromptedViTConfig`.
        backbone_name: Name recorded in saved adapters; defaults to timm's ``architecture.tag``.
    """

    config_class = PromptedViTConfig

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_prompts: int = 10,
        deep: bool = False,
        deep_layers: int | None = None,
        pool: PoolType | None = None,
        prompt_dropout: float = 0.0,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
    ) -> None:
        check_backbone(backbone)
        depth = len(backbone.blocks)
        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}.")
        if deep_layers is not None and not deep:
            raise ValueError("deep_layers applies only to deep prompts; pass deep=True or drop deep_layers.")
        if deep_layers is not None and not 1 <= deep_layers <= depth:
            raise ValueError(
                f"deep_layers must be in [1, {depth}] (the backbone's depth), got {deep_layers}."
            )
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}.")
        super().__init__(
            backbone,
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            train_backbone=train_backbone,
            backbone_name=backbone_name,
            num_prompts=num_prompts,
            deep=deep,
            deep_layers=deep_layers,
            prompt_dropout=prompt_dropout,
        )
        self.num_prompts = num_prompts
        self.num_prompt_layers = (deep_layers or depth) if deep else 1
        device = next(backbone.parameters()).device
        self.prompts = nn.Parameter(
            torch.empty(self.num_prompt_layers, num_prompts, self.embed_dim, device=device)
        )
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.reset_prompts()

    def xavier_bound(self) -> float:
        """VPT's uniform prompt-init bound: sqrt(6 / (in_chans * patch_area + D))."""
        ph, pw = self.backbone.patch_embed.patch_size
        return math.sqrt(6.0 / (self.backbone.in_chans * ph * pw + self.embed_dim))

    @torch.no_grad()
    def reset_prompts(self, generator: torch.Generator | None = None) -> None:
        """VPT's random init: uniform in +-``xavier_bound()`` (drawn on CPU so a seed gives one result)."""
        bound = self.xavier_bound()
        values = torch.rand(self.prompts.shape, generator=generator) * (2 * bound) - bound
        self.prompts.copy_(values)

    def _layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.prompts[layer].expand(batch, -1, -1))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: prompts and head (plus the backbone if it trains)."""
        return {"prompts": self.prompts, **super().adapter_parameters()}
