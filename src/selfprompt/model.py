"""The shared classifier around a frozen timm ``VisionTransformer``: timm's own seams plus the per-block ones
that PETL methods (``selfprompt.methods``) override."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from selfprompt.adapter import (
    CONFIG_NAME,
    TaskInfo,
    brings_weights,
    check_fingerprint,
    check_signature,
    load_tensors,
    read_config,
    save_adapter,
    timm_name,
    weights_fingerprint,
)
from selfprompt.backbones import BACKBONE_FAMILIES, BackboneFamily, backbone_family, backbone_info
from selfprompt.backbones import vit as vit_family
from selfprompt.data.transforms import data_config
from selfprompt.hub import adapter_folder, push_folder

import torch
from timm.models.vision_transformer import VisionTransformer
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
            None picks ``mae`` for MAE weights, else ``token`` when the backbone pools its class token, else
            ``avg`` (:func:`backbone_pool`, as the CLI).
        head_init_std: Std of the truncated-normal head weight init (SPT: 0.02, 0.01 for MoCo v3).
        train_backbone: Fine-tune the backbone too (full fine-tuning) instead of freezing it.

    ``renamed_fields`` maps a field's name in the adapters of earlier releases to its name now.
    """

    renamed_fields: ClassVar[dict[str, str]] = {}

    num_classes: int
    pool: PoolType | None = None
    head_init_std: float = 0.02
    train_backbone: bool = False


def backbone_pool(backbone: nn.Module) -> PoolType:
    """The head input of ``pool=None``, as the CLI resolves ``model.pool: null``: the weights family's
    (``mae``, SPT's MAE head, for MAE weights, known from :func:`~selfprompt.backbones.backbone_info`), else
    what the backbone pools itself: ``token`` for a class-token backbone, else ``avg``."""
    family_pool = backbone_info(backbone).pool
    if family_pool is not None:
        return family_pool
    return "token" if getattr(backbone, "global_pool", None) == "token" else "avg"


class UnsupportedBackbone(TypeError):
    """A model refused a backbone whose family lacks what the model needs (:attr:`ViTClassifier.needs`);
    ``family`` is that family, so that the method registry can name the methods that do apply."""

    def __init__(self, message: str, family: BackboneFamily) -> None:
        super().__init__(message)
        self.family = family


def check_backbone(
    backbone: nn.Module, needs: frozenset[str] = frozenset(), who: str = "this model"
) -> BackboneFamily:
    """``backbone``'s family; refuses a class selfprompt has no family for (:func:`backbone_family`), and a
    family that lacks a capability ``needs`` names (:attr:`BackboneFamily.capabilities`)."""
    family = backbone_family(backbone)
    reason = family.missing(needs)
    if reason is not None:
        able = [f.model_class.__name__ for f in BACKBONE_FAMILIES if not f.missing(needs)]
        raise UnsupportedBackbone(
            f"{who} cannot run on timm's {family.model_class.__name__}: {reason}. selfprompt supports timm "
            f"{', '.join(able)} backbones for it; on {family.model_class.__name__} the methods that change "
            f"Linear layers, biases or the head apply (selfprompt.methods.applicable_methods(backbone) lists "
            f"them).",
            family,
        )
    return family


class ViTClassifier(nn.Module):
    """A timm ``VisionTransformer`` with a new linear head: linear probing (frozen backbone, the default) or
    full fine-tuning (``train_backbone=True``), and the base class of every PETL method's model.

    A frozen backbone stays in eval mode whatever ``train()`` is called with. Forward matches timm's own
    (``norm``, pooling, ``fc_norm``) with this class's ``pool`` and head. Methods change it only through its
    seams: :meth:`insert_tokens` (the sequence after the position embedding), :meth:`forward_block` (around
    each block; see :meth:`block_branches` for the attention and MLP branches inside one),
    ``num_extra_tokens`` (tokens a method inserts between the prefix and the patches, which ``avg`` pooling
    leaves out) and :meth:`adapter_parameters` (what trains and what an adapter stores).

    Args:
        backbone: A timm ``VisionTransformer`` (any width/depth, class token or not, register tokens,
            ``no_embed_class``, ``dynamic_img_size``). Its own classifier is not used.
        num_classes, pool, head_init_std, train_backbone: See :class:`ClassifierConfig`.
        backbone_name: Name recorded in saved adapters; defaults to timm's ``architecture.tag``.
    """

    config_class: ClassVar[type[ClassifierConfig]] = ClassifierConfig
    #: What the model needs of the backbone's family beyond its Linear layers, biases and head
    #: (:attr:`selfprompt.backbones.BackboneFamily.capabilities`).
    needs: ClassVar[frozenset[str]] = frozenset()
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
        self.family = check_backbone(backbone, self.needs, type(self).__name__)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
        if pool is None:
            pool = backbone_pool(backbone)
        if pool not in POOL_TYPES:
            raise ValueError(f"pool must be one of {POOL_TYPES}, got {pool!r}.")
        if pool == "token" and getattr(backbone, "cls_token", None) is None:
            raise ValueError("pool='token' needs a class token and this backbone has none; use pool='avg'.")
        self.config = self.config_class(
            num_classes=num_classes,
            pool=pool,
            head_init_std=head_init_std,
            train_backbone=train_backbone,
            **settings,
        )
        self.backbone_name = backbone_name if backbone_name is not None else timm_name(backbone)
        # taken before anything trains: a fine-tuned backbone's adapter records the weights it started from
        self.backbone_fingerprint: dict[str, Any] = weights_fingerprint(backbone)
        #: Class names, preprocessing and training record, saved with the adapter (:class:`TaskInfo`)
        self.task_info = TaskInfo()
        self.backbone = backbone.requires_grad_(train_backbone).train(train_backbone and self.training)
        self.num_prefix_tokens: int = getattr(backbone, "num_prefix_tokens", 0)
        #: What the blocks need besides the tokens (the family's rotary embedding or relative position bias;
        #: None for timm's VisionTransformer), set per forward for its images (:meth:`forward_features`).
        self._positions: Any = self.family.positions(backbone, None)
        device = next(backbone.parameters()).device
        self.head = nn.Linear(backbone.num_features, num_classes, device=device)
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
        return self.run_block(index, block, x)

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s own forward on ``x`` (any tokens inserted after the prefix get no position),
        through the family (:func:`selfprompt.backbones.vit.run_block`)."""
        return self.family.run_block(block, x, self._positions, index)

    def block_branches(
        self,
        index: int,
        block: nn.Module,
        x: torch.Tensor,
        attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        after_attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Block ``index`` with its attention or MLP branch replaced or the stream between them changed,
        through the family's decomposition (:func:`selfprompt.backbones.vit.residual_branches`); with no
        replacement :meth:`run_block`. Models that call it need ``branches`` (:attr:`needs`)."""
        return self.family.residual_branches(
            block, x, self._positions, index, attn=attn, after_attn=after_attn, mlp=mlp
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence ``[prefix ; extra tokens ; patches]`` after the last block (before the final
        norm)."""
        bb = self.backbone
        self._positions = self.family.positions(bb, x)
        x = self.family.prologue(bb, x, insert=self.insert_tokens)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.family.blocks(bb)):
            if recompute:
                x = checkpoint(self.forward_block, index, block, x, use_reentrant=False)
            else:
                x = self.forward_block(index, block, x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (the head's input) from ``forward_features`` output."""
        norm, fc_norm = self.family.final_norms(self.backbone)
        x = x.flatten(1, -2)  # a grid (Swin's) as its tokens
        p = self.num_prefix_tokens
        if self.config.pool == "mae":
            return fc_norm(norm(x[:, p:].mean(dim=1)))
        x = norm(x)
        x = x[:, 0] if self.config.pool == "token" else x[:, p + self.num_extra_tokens :].mean(dim=1)
        return fc_norm(x)

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

    def print_trainable_parameters(self) -> None:
        """Print what trains against the whole model (shared tensors counted once), in peft's words:
        ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330``."""
        trainable = self.num_adapter_parameters()
        total = sum(p.numel() for p in self.parameters())
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter (safetensors), its JSON config with :attr:`task_info` (class names,
        preprocessing, training record) and its model card (``README.md``) into ``directory``."""
        tensors = self.adapter_parameters()
        task = self.task_info
        if task.preprocessing is None:  # what predict would use: the backbone's pretrained config
            task = replace(task, preprocessing=data_config(self.backbone))
        task.check(self.config.num_classes, f"{type(self).__name__}.task_info")
        return save_adapter(
            directory,
            type(self).__name__,
            self.config,
            self.backbone,
            self.backbone_name,
            tensors,
            self.backbone_fingerprint,
            task,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: nn.Module,
        backbone_name: str | None = None,
        check_weights: bool = True,
        *,
        revision: str | None = None,
    ) -> ViTClassifier:
        """Rebuild a saved adapter on ``backbone``; refuses a backbone that does not match the saved one (its
        signature; with ``check_weights``, its weights' fingerprint too: ``pretrained=False`` gives random
        weights), and a folder that holds another class (``selfprompt.load_pretrained`` picks the class
        itself). ``directory`` may be a Hub repo id, ``org/name`` (:func:`selfprompt.hub.adapter_folder`; at
        ``revision``)."""
        directory = adapter_folder(directory, revision)
        config = read_config(directory)
        if config["class"] != cls.__name__:
            raise ValueError(
                f"{directory} holds a {config['class']}, not a {cls.__name__}: load it with "
                f"selfprompt.{config['class']}.from_pretrained or selfprompt.load_pretrained."
            )
        check_signature(config["backbone"], backbone, backbone_name, directory)
        renamed = cls.config_class.renamed_fields
        saved = {renamed.get(k, k): v for k, v in config["model"].items()}
        accepted = {f.name for f in fields(cls.config_class)}  # what save_pretrained writes
        unknown = sorted(set(saved) - accepted)
        if unknown:
            raise ValueError(
                f"{directory / CONFIG_NAME}: 'model' holds {unknown}, which {cls.__name__} does "
                f"not take (it takes {sorted(accepted)}); the file is damaged or from another selfprompt."
            )
        model = cls(backbone, backbone_name=backbone_name, **saved)
        held = model.adapter_parameters()
        record = config["backbone"].get("fingerprint")  # None: an adapter of an earlier release
        if record is not None and brings_weights(record, held):
            model.backbone_fingerprint = record  # full fine-tuning: the weights it started from
        elif record is not None and check_weights:
            check_fingerprint(record, backbone, directory)
        load_tensors(directory, held)
        model.task_info = TaskInfo.from_config(config)
        model.task_info.check(model.config.num_classes, str(directory / CONFIG_NAME))
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Save the adapter (:meth:`save_pretrained`) and commit it to the Hub model repo ``repo_id``
        (:func:`selfprompt.hub.push_folder`: created if missing); returns the commit's URL."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_folder(
                folder, repo_id, private=private, revision=revision, token=token,
                commit_message=commit_message,
            )  # fmt: skip


#: timm's pre-norm ``Block`` (VisionTransformer's) with its branches replaceable; a model reaches any family's
#: through :meth:`ViTClassifier.block_branches`.
residual_branches = vit_family.residual_branches


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
    plain_mae = pool == "mae" and isinstance(backbone.fc_norm, nn.Identity)
    if pool == "mae":  # timm's own layout for global_pool="avg" (norm: Identity, fc_norm: the LayerNorm)
        after = backbone.fc_norm
        backbone.fc_norm = backbone.norm if plain_mae else nn.Sequential(backbone.norm, after)
        backbone.norm = nn.Identity()
    if hasattr(backbone, "_model_args") and (pool != "mae" or plain_mae):
        # what timm's save_for_hf records to rebuild it (create_model("local-dir:...")): where the norm sits
        backbone._model_args = {**backbone._model_args, "fc_norm": pool == "mae"}
    backbone.head.load_state_dict(model.head.state_dict())
    return backbone.requires_grad_(False).eval()
