"""The shared classifier around a frozen timm ``VisionTransformer``: timm's own seams plus the per-block ones
that PETL methods (``selfprompt.methods``) override."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from selfprompt.adapter import check_signature, load_tensors, read_config, save_adapter, timm_name
from selfprompt.backbones import BackboneFamily, backbone_family

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def backbone_pool(backbone: nn.Module) -> PoolType:
    """The head input a backbone pools itself: ``token`` for a class-token backbone, else ``avg``."""
    return "token" if getattr(backbone, "global_pool", None) == "token" else "avg"


def check_backbone(backbone: nn.Module) -> BackboneFamily:
    """``backbone``'s family; refuses a class selfprompt has no family for (:func:`backbone_family`)."""
    return backbone_family(backbone)


class ViTClassifier(nn.Module):
    """A timm ``VisionTransformer`` with a new linear head: linear probing (frozen backbone, the default) or
    full fine-tuning (``train_backbone=True``), and the base class of every PETL method's model.

    A frozen backbone stays in eval mode whatever ``train()`` is called with. Forward matches timm's own
    (``norm``, pooling, ``fc_norm``) with this class's ``pool`` and head. Methods change it only through its
    seams: :meth:`insert_tokens` (the sequence after the position embedding), :meth:`forward_block` (around
    each block; see :func:`residual_branches` for the attention and MLP branches inside one),
    ``num_extra_tokens`` (tokens a method inserts between the prefix and the patches, which ``avg`` pooling
    leaves out) and :meth:`adapter_parameters` (what trains and what an adapter stores).

    Args:
        backbone: A timm ``VisionTransformer`` (any width/depth, class token or not, register tokens,
            ``no_embed_class``, ``dynamic_img_size``). Its own classifier is not used.
        num_classes, pool, head_init_std, train_backbone: See :class:`ClassifierConfig`.
        backbone_name: Name recorded in saved adapters; defaults to timm's ``architecture.tag``.
    """

    config_class: ClassVar[type[ClassifierConfig]] = ClassifierConfig
    num_extra_tokens: int = 0
    # recompute each block's activations in the backward pass instead of keeping them (engine option)
    checkpoint_blocks: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.family = check_backbone(backbone)
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
            **settings,
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

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Seam: the token sequence after the position embedding, before ``norm_pre`` and block 0."""
        return x

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Seam: run block ``index`` of the backbone on ``x``."""
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence ``[prefix ; extra tokens ; patches]`` after the last block (before the final
        norm)."""
        bb = self.backbone
        x = self.family.prologue(bb, x, insert=self.insert_tokens)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for index, block in enumerate(bb.blocks):
            if recompute:
                x = checkpoint(self.forward_block, index, block, x, use_reentrant=False)
            else:
                x = self.forward_block(index, block, x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (the head's input) from ``forward_features`` output."""
        bb = self.backbone
        p = self.num_prefix_tokens
        if self.config.pool == "mae":
            return bb.fc_norm(bb.norm(x[:, p:].mean(dim=1)))
        x = bb.norm(x)
        x = x[:, 0] if self.config.pool == "token" else x[:, p + self.num_extra_tokens :].mean(dim=1)
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
        tensors = self.adapter_parameters()
        return save_adapter(
            directory, type(self).__name__, self.config, self.backbone, self.backbone_name, tensors
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: nn.Module, backbone_name: str | None = None
    ) -> ViTClassifier:
        """Rebuild a saved adapter on ``backbone``; refuses a backbone that does not match the saved one, and
        a folder that holds another class (``selfprompt.load_pretrained`` picks the class itself)."""
        directory = Path(directory)
        config = read_config(directory)
        if config["class"] != cls.__name__:
            raise ValueError(
                f"{directory} holds a {config['class']}, not a {cls.__name__}: load it with "
                f"selfprompt.{config['class']}.from_pretrained or selfprompt.load_pretrained."
            )
        check_signature(config["backbone"], backbone, backbone_name, directory)
        accepted = {f.name for f in fields(cls.config_class)}  # what save_pretrained writes
        unknown = sorted(set(config["model"]) - accepted)
        if unknown:
            raise ValueError(
                f"{directory / 'adapter_config.json'}: 'model' holds {unknown}, which {cls.__name__} does "
                f"not take (it takes {sorted(accepted)}); the file is damaged or from another selfprompt."
            )
        model = cls(backbone, backbone_name=backbone_name, **config["model"])
        load_tensors(directory, model.adapter_parameters())
        return model


def residual_branches(
    block: nn.Module,
    x: torch.Tensor,
    attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A timm pre-norm ``Block``'s forward with its branches replaceable, for methods that act inside one:
    ``x1 = x + drop_path(ls(attn(norm1(x))))``, ``x1 = after_attn(x1)``, then
    ``x1 + drop_path(ls(mlp(norm2(x1))))`` where ``mlp(h)`` defaults to ``block.mlp(h)``. With no replacement
    it computes exactly ``block(x)``."""
    if not isinstance(block, Block):
        raise TypeError(
            f"this method acts inside timm's pre-norm Block, and this backbone's blocks are "
            f"{type(block).__name__}; use a prompt method that wraps whole blocks (vpt-*, spt-*)."
        )
    x = x + block.drop_path1(block.ls1((attn or block.attn)(block.norm1(x))))
    if after_attn is not None:
        x = after_attn(x)
    return x + block.drop_path2(block.ls2((mlp or block.mlp)(block.norm2(x))))


def private_copy(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone``'s module tree that shares its parameter and buffer tensors: methods that hook or
    replace modules (LoRA, SSF) do it on this copy, so the object they were given (and any deep copy of it)
    stays a plain timm model, without duplicating the frozen weights in memory."""
    import copy  # local: keeps this append-only addition to the module self-contained

    shared = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    return copy.deepcopy(backbone, memo=shared)


def timm_classifier(model: ViTClassifier, backbone: VisionTransformer) -> VisionTransformer:
    """``backbone`` (a merged copy of ``model.backbone``) made a plain timm ``VisionTransformer`` computing
    ``model``'s logits: ``model``'s head, timm's pooling set to ``model``'s; for methods with no extra tokens.
    ``mae`` pooling (final norm after the mean) becomes timm's ``avg`` with the final norm as ``fc_norm``."""
    if model.num_extra_tokens:
        raise ValueError("a model that inserts tokens has no plain timm equivalent.")
    pool = model.config.pool
    backbone.reset_classifier(model.config.num_classes, "token" if pool == "token" else "avg")
    backbone.pool_include_prefix = False
    if pool == "mae":  # timm's own layout for global_pool="avg" (norm: Identity, fc_norm: the LayerNorm)
        after = backbone.fc_norm
        backbone.fc_norm = (
            backbone.norm if isinstance(after, nn.Identity) else nn.Sequential(backbone.norm, after)
        )
        backbone.norm = nn.Identity()
    backbone.head.load_state_dict(model.head.state_dict())
    return backbone.requires_grad_(False).eval()
