"""SSF, Scaling & Shifting your Features (Lian et al., NeurIPS 2022; official code dongzelian/SSF, MIT):
a learnable per-channel affine ``gamma * x + beta`` after each linear-type op of the frozen backbone.

Placement (docs/methods.md, SSF): after the patch embedding (D); in every block after ``norm1`` (D),
``attn.qkv`` (3D, before the head split), ``attn.proj`` (D, before its dropout), ``norm2`` (D), ``mlp.fc1``
(4D, before the activation) and ``mlp.fc2`` (D); after the final norm (D; ``fc_norm`` for a backbone whose
``norm`` is an Identity because it normalises after pooling). Where that final norm comes after pooling,
``ssf.final_placement: tokens`` moves the last scale and shift onto the tokens before pooling, as the official
code (:class:`SSFSettings`). Init: gamma ~ N(1, 0.02^2), beta ~ N(0, 0.02^2), drawn
from the global RNG (the engine seeds it before building the model). For ``vit_base_patch16_224`` with 100
classes: 12 * 2 * 11 * 768 + 4 * 768 = 205,824 + 76,900 head = 282,724.

How the ops are hooked: each op is replaced by a :class:`ScaleShift` wrapper (``op`` inside it, then the
affine) in a *private copy* of the backbone's module tree that shares the frozen weight tensors
(:func:`~selfprompt.model.private_copy`). The backbone object passed in keeps its own modules, so it (and
any deep copy of it, which the engine makes per stage) stays a plain timm ViT, and no weights are
duplicated. Wrappers rather than forward hooks: a wrapper is an ordinary submodule, so a deep copy or a
pickle of the model keeps each affine with its op, and re-parameterising a copy is "fold, then put the op
back" with no hook bookkeeping. The patch embedding is wrapped at its last op, ``patch_embed.norm`` (an
Identity for most ViTs), so ``patch_embed`` keeps its attributes (patch size, grid). timm's Attention still
calls ``self.qkv(x)`` and its fused ``scaled_dot_product_attention``.

Re-parameterisation (:meth:`SSF.merged`): after a Linear or Conv (W, b): W' = diag(gamma) W, b' = gamma b +
beta; after a LayerNorm (g, h): g' = gamma g, h' = gamma h + beta; an Identity ``patch_embed.norm`` folds
into ``patch_embed.proj``. The result is a plain timm ``VisionTransformer`` with no extra module or FLOP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from selfprompt.backbones import backbone_family
from selfprompt.methods.registry import Search, register_method, register_settings, settings_builder
from selfprompt.methods.settings import adapter_config, settings_from
from selfprompt.model import PoolType, ViTClassifier, private_copy, timm_classifier

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

#: Where the last scale and shift sit when the final norm comes after pooling (``mae`` pooling, or a backbone
#: whose ``norm`` is an Identity and ``fc_norm`` a LayerNorm): ``after_norm`` after that norm (it folds into
#: it), ``tokens`` on the tokens before pooling, as the official code (no op absorbs it). Where the final
#: norm acts on the tokens, both are the same: after it.
FINAL_PLACEMENTS: tuple[str, ...] = ("after_norm", "tokens")


class ScaleShift(nn.Module):
    """``op`` followed by SSF's per-channel ``scale * y + shift`` along the last dimension."""

    def __init__(self, op: nn.Module, dim: int, device=None) -> None:
        super().__init__()
        self.op = op
        self.scale = nn.Parameter(torch.ones(dim, device=device))
        self.shift = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.op(x, *args, **kwargs) * self.scale + self.shift


def _channels(op: nn.Module, path: str) -> int:
    """Output channels of an op SSF can follow and fold into; refuses others."""
    if isinstance(op, nn.Linear):
        return op.out_features
    if isinstance(op, nn.LayerNorm) and op.elementwise_affine and len(op.normalized_shape) == 1:
        return op.normalized_shape[0]
    raise TypeError(
        f"SSF follows Linear layers and affine LayerNorms; {path} is a {type(op).__name__} "
        f"(a timm VisionTransformer of another block type?)."
    )


def ssf_targets(backbone: VisionTransformer) -> list[tuple[str, int]]:
    """The module paths SSF wraps in ``backbone`` and their channel counts, in forward order."""
    embed = backbone.patch_embed
    if isinstance(embed.norm, nn.Identity):
        if not isinstance(getattr(embed, "proj", None), nn.Conv2d):
            raise TypeError(f"SSF folds into patch_embed.proj, a {type(embed.proj).__name__} here.")
        targets = [("patch_embed.norm", embed.proj.out_channels)]
    else:
        targets = [("patch_embed.norm", _channels(embed.norm, "patch_embed.norm"))]
    family = backbone_family(backbone)
    for i, block in enumerate(family.blocks(backbone)):
        path = f"{family.blocks_path}.{i}"
        targets += [
            (f"{path}.{op}", _channels(block.get_submodule(op), f"{path}.{op}"))
            for op in family.block_ops(block)
        ]
    final = "norm" if not isinstance(backbone.norm, nn.Identity) else "fc_norm"
    if not isinstance(backbone.get_submodule(final), nn.Identity):
        targets.append((final, _channels(backbone.get_submodule(final), final)))
    return targets


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def _fold(op: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``op(x)`` compute ``scale * op(x) + shift`` (a Linear, Conv2d or affine LayerNorm)."""
    weight_scale = scale.view(-1, *([1] * (op.weight.ndim - 1)))
    op.weight.mul_(weight_scale)
    if op.bias is None:
        op.bias = nn.Parameter(shift.clone(), requires_grad=False)
    else:
        op.bias.mul_(scale).add_(shift)


@dataclass
class SSFSettings:
    """SSF: where its last scale and shift sit.

    Attributes:
        final_placement: Where the final norm comes after pooling (``mae`` pooling, or ``fc_norm``):
            ``after_norm`` puts the last scale and shift after that norm (ours; it folds into the norm),
            ``tokens`` on the tokens before pooling, as the official code (no merged form). Elsewhere both
            put it after the final norm. See docs/methods.md, SSF.
    """

    final_placement: str = "after_norm"  # a str, so that a wrong value gets the one-line check

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        if self.final_placement in FINAL_PLACEMENTS:
            return []
        return [f"final_placement must be one of {FINAL_PLACEMENTS}, got {self.final_placement!r}"]


#: What an SSF adapter stores: ClassifierConfig's fields plus SSFSettings' (adapters written before
#: final_placement existed load as ``after_norm``).
SSFConfig = adapter_config(SSFSettings)


class SSF(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with SSF's scale and shift after each of its linear-type ops and
    a new linear head; only the scales, shifts and head train.

    Args:
        backbone, num_classes, pool, head_init_std, backbone_name: See
            :class:`~selfprompt.model.ViTClassifier` (``train_backbone`` must stay False).
        settings: :class:`SSFSettings` (or its fields by name).
    """

    config_class = SSFConfig

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: SSFSettings | None = None,
        *,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **fields: Any,
    ) -> None:
        if train_backbone:
            raise ValueError("SSF trains its scales and shifts only; train_backbone must be False.")
        settings = settings_from("ssf", SSFSettings, settings, fields, owner="SSF")
        final_placement = settings.final_placement
        super().__init__(
            private_copy(backbone),
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            backbone_name=backbone_name,
            final_placement=final_placement,
        )
        device = next(self.backbone.parameters()).device
        self.family.plain_linears(self.backbone)  # the private copy: every op one the block calls
        targets = ssf_targets(self.backbone)
        norm_after_pool = self.config.pool == "mae" or isinstance(self.backbone.norm, nn.Identity)
        #: The official placement's last affine, on the tokens before pooling (``pool``); None otherwise.
        self.token_ssf: ScaleShift | None = None
        if final_placement == "tokens" and norm_after_pool and targets[-1][0] in ("norm", "fc_norm"):
            self.token_ssf = ScaleShift(nn.Identity(), targets.pop()[1], device)
        self.ssf_paths = tuple(path for path, _ in targets)
        for path, dim in targets:
            _replace(self.backbone, path, ScaleShift(self.backbone.get_submodule(path), dim, device))
        self.reset_ssf()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return super().pool(x if self.token_ssf is None else self.token_ssf(x))

    def wrappers(self) -> dict[str, ScaleShift]:
        return {path: self.backbone.get_submodule(path) for path in self.ssf_paths}

    @torch.no_grad()
    def reset_ssf(self, std: float = 0.02) -> None:
        """SSF's init: scale ~ N(1, std^2), shift ~ N(0, std^2) (global RNG); ``std=0`` is the identity."""
        for wrapper in (*self.wrappers().values(), *([self.token_ssf] if self.token_ssf else [])):
            nn.init.normal_(wrapper.scale, 1.0, std)
            nn.init.normal_(wrapper.shift, 0.0, std)

    def ssf_parameters(self) -> dict[str, nn.Parameter]:
        """Every scale and shift, by its name in this model (``backbone.<op path>.scale|shift``, and
        ``token_ssf.scale|shift`` for the ``tokens`` placement's last one)."""
        params = {
            f"backbone.{path}.{kind}": getattr(wrapper, kind)
            for path, wrapper in self.wrappers().items()
            for kind in ("scale", "shift")
        }
        if self.token_ssf is not None:
            params |= {f"token_ssf.{kind}": getattr(self.token_ssf, kind) for kind in ("scale", "shift")}
        return params

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: every scale and shift and the head."""
        return {**self.ssf_parameters(), **super().adapter_parameters()}

    def merged(self) -> VisionTransformer:
        """A plain timm ``VisionTransformer`` with every scale and shift folded into the op before it (on a
        copy), and this model's head and pooling: the same logits, no extra modules or FLOPs."""
        if self.token_ssf is not None:
            raise ValueError(
                "ssf.final_placement 'tokens' with a norm after pooling puts the last scale and shift on the "
                "tokens before that norm, where no op absorbs it: this model has no merged form."
            )
        backbone = copy.deepcopy(self.backbone)
        for path in self.ssf_paths:
            wrapper = backbone.get_submodule(path)
            op = wrapper.op
            if isinstance(op, nn.Identity):  # patch_embed.norm of most ViTs: fold into the convolution
                _fold(backbone.patch_embed.proj, wrapper.scale, wrapper.shift)
            else:
                _fold(op, wrapper.scale, wrapper.shift)
            _replace(backbone, path, op)
        return timm_classifier(self, backbone)


register_settings("ssf", SSFSettings, "SSF settings of the ssf method (final_placement).")


register_method(
    "ssf",
    "SSF: per-channel scale and shift after every linear op and norm; scales, shifts and head train",
    SSF,
    settings_builder(SSF),
    settings="ssf",
    order=22,
    search=Search(
        {"optim.lr": [1e-2, 5e-3, 1e-3], "optim.weight_decay": [5e-5]},
        "centred on SSF's scripts' lr 5e-3, weight_decay 5e-5 (docs/methods.md, SSF); the neighbours "
        "are ours",
    ),
)
