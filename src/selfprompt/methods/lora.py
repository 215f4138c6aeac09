"""LoRA (Hu et al., ICLR 2022) on a frozen timm ViT, through huggingface ``peft`` (Apache-2.0; install with
``pip install 'selfprompt[lora]'``). The ViT recipe follows NOAH (MIT) and peft's own custom-model use.

A targeted ``nn.Linear`` computes ``y = W x + b + (alpha / rank) * B A drop(x)`` with W, b frozen,
``A`` (rank x in) kaiming-uniform and ``B`` (out x rank) zero, so the model starts exactly at the linear
probe. The default target is timm's fused ``attn.qkv``: one A shared by Q, K and V and one B for all three
(NOAH's and peft's placement; V-PETL's variant adapts only the Q and V slices, same count). For
``vit_base_patch16_224`` with 100 classes and rank 8: 12 * 8 * (768 + 2304) = 294,912 + 76,900 head =
371,812 (docs/methods.md, LoRA).

How it is built: ``peft.tuners.lora.LoraModel`` replaces each targeted Linear by peft's ``lora.Linear`` in
a *private copy* of the backbone's module tree that shares the frozen weight tensors
(:func:`~selfprompt.model.private_copy`), so the backbone object passed in is never changed and a second
model built on a deep copy of it gets a plain timm ViT. timm's Attention still calls ``self.qkv(x)`` and
then its fused ``scaled_dot_product_attention``. Targets are anchored to the blocks
(``blocks.<i>.attn.qkv``): a bare ``proj`` would also match ``patch_embed.proj`` and is refused.

peft's own format, both ways (docs/methods.md, LoRA): :func:`save_peft` writes a folder that
``peft.PeftModel.from_pretrained(peft_base(backbone, n, pool), folder)`` loads to this model's logits
(``peft_base``: a plain timm classifier with this model's pooling; for ``token`` and ``avg`` pooling it is
``timm.create_model(name, num_classes=n)`` and ``global_pool="avg", fc_norm=False``), and
:func:`load_peft` reads a LoRA that peft trained on a timm ViT (its Linear layers inside the blocks, the head
in ``modules_to_save``) as a :class:`LoRA`.

The backbone stays in eval mode like every method here; LoRA's own dropout (inside peft's layers) follows
the model's train/eval mode. The adapter holds the A/B tensors and the head (kilobytes), and
:meth:`LoRA.merged` folds ``W <- W + s B A`` with peft's ``merge_and_unload`` into a plain timm
``VisionTransformer`` with the head, which gives the same logits.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfprompt.adapter import copy_tensors, read_tensors
from selfprompt.backbones import vit as vit_family
from selfprompt.methods.registry import Search, register_method, register_settings, settings_builder
from selfprompt.methods.settings import (
    adapter_config,
    number_problem,
    positive_int,
    settings_from,
)
from selfprompt.model import PoolType, ViTClassifier, backbone_pool, private_copy, timm_classifier

from timm.models.vision_transformer import VisionTransformer
from torch import nn

#: What ``lora.targets`` accepts: the Linear layers of a block by canonical name (each backbone family says
#: which paths inside its blocks they are: :attr:`selfprompt.backbones.BackboneFamily.linears`).
TARGETS: dict[str, str] = vit_family.LINEARS
_ALIASES = {"attn.qkv": "qkv", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def targets_problem(targets: Any) -> str | None:
    """What is wrong with ``targets`` (``targets: ...``), or None."""
    try:
        normalise_targets(targets)
    except ValueError as error:
        return str(error).removeprefix("lora.").removesuffix(".")
    return None


def normalise_targets(targets: Any) -> tuple[str, ...]:
    """``targets`` as canonical names (``qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), duplicates
    dropped; anything else is refused, a bare ``proj`` with the reason."""
    if isinstance(targets, str):
        targets = [targets]
    names: list[str] = []
    for target in targets:
        if target == "proj":
            raise ValueError(
                "lora.targets: a bare 'proj' also matches the patch embedding's Conv2d (patch_embed.proj); "
                "use 'attn.proj' for the attention output projection."
            )
        name = _ALIASES.get(target, target)
        if name not in TARGETS:
            raise ValueError(f"lora.targets: unknown target {target!r}; choose from {', '.join(TARGETS)}.")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("lora.targets is empty; give at least one of " + ", ".join(TARGETS) + ".")
    return tuple(names)


def target_pattern(
    targets: tuple[str, ...], linears: dict[str, str] = TARGETS, blocks: str = "blocks"
) -> str:
    """The regular expression peft ``re.fullmatch``-es against module names: the targets inside each block
    of ``blocks`` (the backbone family's ``blocks_path``), at the paths ``linears`` (the family's) gives."""
    return re.escape(blocks) + r"\.\d+\.(" + "|".join(linears[t] for t in targets) + ")"


@dataclass
class LoRASettings:
    """LoRA: rank, scale, dropout and which Linear layers of each block it adapts.

    Attributes:
        rank: Rank r of A (r x in) and B (out x r); 8 as NOAH, V-PETL and peft's default.
        alpha: LoRA's scale is alpha / rank; 8 with rank 8 gives 1, NOAH's (no alpha) and peft's default.
        dropout: Dropout on the LoRA branch's input while training (NOAH: 0.1; peft's default 0).
        targets: Linear layers of every block: qkv (timm's fused Q/K/V projection, the default), attn.proj,
            mlp.fc1, mlp.fc2.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # a list: what a saved config reads back

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        out = [] if positive_int(self.rank) else [f"rank must be an integer >= 1, got {self.rank!r}"]
        out += number_problem("alpha", self.alpha, 0, math.inf, "a number > 0", low_open=True)
        out += number_problem("dropout", self.dropout, 0, 1, "in [0, 1)")
        problem = targets_problem(self.targets)
        return out + ([problem] if problem else [])


#: What a LoRA adapter stores: ClassifierConfig's fields plus LoRASettings' (the name of earlier releases).
LoRAConfig = adapter_config(LoRASettings)


class LoRA(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with LoRA on the chosen Linear layers of every block and a new
    linear head; only the LoRA A/B matrices and the head train.

    Args:
        backbone: A timm ``VisionTransformer``; left unchanged (see the module docstring).
        num_classes, pool, head_init_std, backbone_name: See :class:`~selfprompt.model.ViTClassifier`.
        settings: Its :class:`LoRASettings` (default: their defaults); ``fields`` replace single ones by
            name (``rank=4``).
    """

    config_class = LoRAConfig

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: LoRASettings | None = None,
        *,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **fields: Any,
    ) -> None:
        if train_backbone:
            raise ValueError("LoRA trains its low-rank matrices only; train_backbone must be False.")
        settings = settings_from("lora", LoRASettings, settings, fields, owner="LoRA")
        rank, alpha, dropout = settings.rank, float(settings.alpha), settings.dropout
        targets = normalise_targets(settings.targets)
        peft_lora = _peft_lora()
        super().__init__(
            private_copy(backbone),
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            backbone_name=backbone_name,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
        )
        self.family.plain_linears(self.backbone)  # the private copy: every target a Linear the block calls
        pattern = target_pattern(targets, self.family.linears, self.family.blocks_path)
        peft_config = peft_lora.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern
        )
        # peft swaps the targeted Linear layers of self.backbone (the private copy) in place; its wrapper is
        # kept outside the module tree (no second path to the same parameters) for merge_and_unload.
        self.__dict__["_peft"] = peft_lora.LoraModel(self.backbone, peft_config, "default")
        self.backbone.requires_grad_(False)
        for param in self.lora_parameters().values():
            param.requires_grad_(True)
        self.train(self.training)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The A and B matrices, by their name in this model."""
        return {
            f"backbone.{name}": param
            for name, param in self.backbone.named_parameters()
            if re.search(r"\.lora_[AB]\.", name)
        }

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: every LoRA A and B matrix and the head."""
        return {**self.lora_parameters(), **super().adapter_parameters()}

    def train(self, mode: bool = True) -> LoRA:
        """The backbone stays in eval mode; LoRA's dropout layers follow ``mode``."""
        super().train(mode)
        for name, module in self.backbone.named_modules():
            if name.endswith(".lora_dropout"):
                module.train(mode)
        return self

    def merged(self) -> VisionTransformer:
        """A plain timm ``VisionTransformer`` with ``W + (alpha / rank) B A`` folded into each targeted Linear
        (peft's ``merge_and_unload``, on a copy) and this model's head and pooling: the same logits, no extra
        modules or FLOPs. This model and its backbone are left unchanged."""
        backbone = copy.deepcopy(self.__dict__["_peft"]).merge_and_unload()
        return timm_classifier(self, backbone)


def _peft_lora() -> Any:
    try:
        from peft.tuners import lora as peft_lora
    except ImportError as error:
        raise ImportError(
            "method 'lora' needs huggingface peft: pip install 'selfprompt[lora]' (peft>=0.6)."
        ) from error
    return peft_lora


PEFT_PREFIX = "base_model.model."  # what peft's saved tensor names start with
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_base(backbone: VisionTransformer, num_classes: int, pool: PoolType) -> VisionTransformer:
    """The plain timm classifier a LoRA in peft's format loads onto (``PeftModel.from_pretrained``): a copy of
    ``backbone`` (left unchanged) with a head of ``num_classes`` and timm's pooling set to ``pool``."""
    plain = ViTClassifier(private_copy(backbone), num_classes, pool=pool)
    return timm_classifier(plain, plain.backbone)


def save_peft(model: LoRA, folder: str | Path) -> Path:
    """Write ``model`` in peft's LoRA format (peft's own ``save_pretrained``): its A and B matrices and the
    head as ``modules_to_save``; ``PeftModel.from_pretrained(peft_base(backbone, n, pool), folder)`` gives
    its logits. The model is left unchanged."""
    peft_lora = _peft_lora()
    from peft import get_peft_model

    cfg = model.config
    plain = copy.deepcopy(model.__dict__["_peft"]).unload()  # the backbone without LoRA layers
    base = timm_classifier(model, plain)
    peft_config = peft_lora.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_pattern(normalise_targets(cfg.targets)),
        modules_to_save=["head"],
    )
    peft_model = get_peft_model(base, peft_config)
    peft_model.peft_config["default"].base_model_name_or_path = model.backbone_name  # the timm name
    ours = {name.removeprefix("backbone."): p for name, p in model.lora_parameters().items()}
    theirs = {
        name.removeprefix(PEFT_PREFIX): p
        for name, p in peft_model.named_parameters()
        if re.search(r"\.lora_[AB]\.", name)
    }
    copy_tensors(ours, theirs, Path(f"<{type(model).__name__} in memory>"))
    folder = Path(folder)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)  # a ViT has no vocabulary to check
    return folder


def _peft_targets(peft_config: Any, backbone: nn.Module) -> list[str]:
    """The :data:`TARGETS` that ``peft_config`` selects in ``backbone`` (by peft's own name matching): the
    same Linear layers in every block, else refused."""
    from peft.tuners.tuners_utils import check_target_module_exists

    chosen = [
        name for name, _ in backbone.named_modules() if name and check_target_module_exists(peft_config, name)
    ]
    by_block: dict[str, set[str]] = {}
    for name in chosen:
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        target = next(
            (t for t, pattern in TARGETS.items() if found and re.fullmatch(pattern, found[2])), None
        )
        if target is None:
            raise ValueError(
                f"the peft LoRA targets {name}, which selfprompt's LoRA does not adapt; it adapts the Linear "
                f"layers {', '.join(TARGETS)} of every block."
            )
        by_block.setdefault(found[1], set()).add(target)
    depth = len(backbone.blocks)
    if len(by_block) != depth or len({frozenset(t) for t in by_block.values()}) != 1:
        raise ValueError(
            f"the peft LoRA adapts {sorted(chosen)}: selfprompt's LoRA adapts the same layers in all {depth} "
            f"blocks."
        )
    return [t for t in TARGETS if t in next(iter(by_block.values()))]


def load_peft(
    folder: str | Path,
    backbone: VisionTransformer,
    pool: PoolType | None = None,
    backbone_name: str | None = None,
) -> LoRA:
    """A :class:`LoRA` from a folder in peft's LoRA format (``PeftModel.save_pretrained`` of a timm ViT with
    its Linear layers inside the blocks adapted and the head in ``modules_to_save``); ``pool`` None is the
    backbone's (:func:`~selfprompt.model.backbone_pool`, as the timm model peft trained had it)."""
    peft_lora = _peft_lora()
    folder = Path(folder)
    peft_config = peft_lora.LoraConfig.from_pretrained(str(folder))
    unsupported = {
        "use_dora": peft_config.use_dora,
        "bias": peft_config.bias != "none" and peft_config.bias,
        "rank_pattern": peft_config.rank_pattern,
        "alpha_pattern": peft_config.alpha_pattern,
        "layers_to_transform": peft_config.layers_to_transform,
        "use_rslora": peft_config.use_rslora,
        "fan_in_fan_out": peft_config.fan_in_fan_out,
    }
    unsupported = {key: value for key, value in unsupported.items() if value}
    if unsupported:
        raise ValueError(f"{folder}: selfprompt's LoRA has no {sorted(unsupported)} ({unsupported}).")
    tensors = {
        name.removeprefix(PEFT_PREFIX): value for name, value in read_tensors(folder / PEFT_WEIGHTS).items()
    }
    if "head.weight" not in tensors:
        raise ValueError(
            f"{folder} holds no trained head (peft's modules_to_save=['head']): a selfprompt adapter is the "
            f"LoRA matrices and the head it was trained with."
        )
    settings = LoRASettings(
        rank=peft_config.r,
        alpha=float(peft_config.lora_alpha),
        dropout=peft_config.lora_dropout,
        targets=_peft_targets(peft_config, backbone),
    )
    model = LoRA(
        backbone,
        tensors["head.weight"].shape[0],
        settings,
        pool=pool or backbone_pool(backbone),
        backbone_name=backbone_name,
    )
    ours = {
        re.sub(r"\.lora_([AB])\.default\.", r".lora_\1.", name): p
        for name, p in model.adapter_parameters().items()
    }
    copy_tensors(
        tensors, {name.removeprefix("backbone."): p for name, p in ours.items()}, folder / PEFT_WEIGHTS
    )
    return model


register_settings("lora", LoRASettings, "LoRA settings of the lora method (rank, alpha, dropout, targets).")


register_method(
    "lora",
    "LoRA (via peft) on the blocks' Linear layers (default the fused qkv); low-rank matrices and head train",
    LoRA,
    settings_builder(LoRA),
    settings="lora",
    order=20,
    search=Search(
        {"optim.lr": [5e-3, 1e-3, 5e-4], "optim.weight_decay": [1e-4, 1e-2]},
        "centred on NOAH's and V-PETL's AdamW lr 1e-3, weight_decay 1e-4 (docs/methods.md, LoRA and "
        "AdaptFormer); the neighbours are ours",
    ),
)
