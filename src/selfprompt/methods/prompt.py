"""Visual prompt tuning: VPT (Jia et al., ECCV 2022) and SPT (Wang et al., ICML 2024), shallow or deep.

One model, :class:`PromptedViT`, and four names: ``vpt-shallow`` / ``vpt-deep`` initialise the prompts with
VPT's xavier-uniform draw; ``spt-shallow`` / ``spt-deep`` from prototypes of the task's own patch tokens
(``prompt.init``: any registered initializer, ``sample`` by default as in the official code). VPT and SPT
train the same model; only the initializer differs, so they are one module with four registrations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from selfprompt.adapter import check_finite, read_tensors
from selfprompt.atomic import atomic_write
from selfprompt.init import init_prompts
from selfprompt.init.registry import available_initializers, get_initializer
from selfprompt.methods.registry import Method, Search, register_method, register_settings
from selfprompt.methods.settings import (
    adapter_config,
    in_range,
    is_integer,
    number_problem,
    positive_int,
    settings_from,
)
from selfprompt.model import PoolType, ViTClassifier

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

MAX_PROMPTS = 1024  # per layer; the papers use at most 200, and attention grows with their square


@dataclass
class PromptSettings:
    """The prompts of a prompted model: how many, on how many blocks, their dropout. What every prompted
    model takes (``PromptedViT(backbone, n, num_prompts=20)``) and its adapter stores; the ``prompt`` recipe
    section is these fields plus the initializer's (:class:`PromptRunSettings`).

    Attributes:
        num_prompts: Prompt tokens per prompted layer (M); None is the default (a method's: VPT/SPT 20 deep,
            100 shallow, the official README; a model built directly: its class's, 10 for PromptedViT).
        deep_layers: Deep prompts on the first k blocks only; None prompts all blocks.
        dropout: Dropout on prompt tokens while training (VPT: 0.1).
    """

    num_prompts: int | None = None
    deep_layers: int | None = None
    dropout: float = 0.0

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...`` (the check prefixes the section)."""
        out = []
        n = self.num_prompts
        if n is not None and not (is_integer(n) and 1 <= n <= MAX_PROMPTS):
            out.append(f"num_prompts must be an integer in 1..{MAX_PROMPTS} or null (the default), got {n!r}")
        if self.deep_layers is not None and not positive_int(self.deep_layers):
            out.append(f"deep_layers must be an integer >= 1 or null (all blocks), got {self.deep_layers!r}")
        return out + number_problem("dropout", self.dropout, 0, 1, "in [0, 1)")


@dataclass
class PromptRunSettings(PromptSettings):
    """The ``prompt`` recipe section: :class:`PromptSettings` plus where the prompts' first values come from,
    which a run reads before training and an adapter does not store.

    Attributes:
        init: Prompt initializer (``selfprompt.available_initializers()``); None is the method's default
            (xavier for vpt-*, sample for spt-*, the official default).
        init_fraction: Share of training images that SPT prototypes are built from; None uses all.
        init_max_images: Cap on the number of images SPT prototypes are built from.
        init_topk: VIPAMIN's k: patch positions averaged per matched prompt; None is its default, 8.
        init_lambda: VIPAMIN's lambda: each prompt's orthogonal share, in [0, 1]; None is its default, 0.5.
        file: Start from prompts saved by ``selfprompt init-prompts`` instead of initialising.
    """

    init: str | None = None
    init_fraction: float | None = None
    init_max_images: int | None = None
    init_topk: int | None = None
    init_lambda: float | None = None
    file: str | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        if self.init_fraction is not None and not in_range(
            self.init_fraction, 0, 1, low_open=True, high_open=False
        ):
            out.append(f"init_fraction must be in (0, 1] or null (all images), got {self.init_fraction!r}")
        if self.init_max_images is not None and not positive_int(self.init_max_images):
            out.append(f"init_max_images must be >= 1 or null, got {self.init_max_images!r}")
        if self.init_topk is not None and not positive_int(self.init_topk):
            out.append(f"init_topk must be an integer >= 1 or null (the default), got {self.init_topk!r}")
        if self.init_lambda is not None:
            out += number_problem("init_lambda", self.init_lambda, 0, 1, "in [0, 1]", high_open=False)
        options = initializer_options(self)
        takes = get_initializer(self.init).options if self.init in available_initializers() else ()
        for field, option in INIT_OPTIONS.items():
            if option in options and option not in takes:
                owners = [n for n in available_initializers() if option in get_initializer(n).options]
                out.append(
                    f"{field} is an option of prompt.init {' or '.join(owners)}, not of "
                    f"{self.init or 'the method default'}; set prompt.init or drop {field}"
                )
        return out


#: The prompt section's fields that are an initializer's own options, and the option each one sets.
INIT_OPTIONS = {"init_topk": "topk", "init_lambda": "lam"}


def initializer_options(settings: Any) -> dict[str, Any]:
    """The initializer options a ``prompt`` section sets (those left null keep the initializer's defaults),
    by the keyword ``init_prompts(..., options=...)`` takes."""
    return {
        option: getattr(settings, field)
        for field, option in INIT_OPTIONS.items()
        if getattr(settings, field, None) is not None
    }


#: What a prompted model's adapter stores: ClassifierConfig's fields, PromptSettings' and ``deep``.
PromptedViTConfig = adapter_config(PromptSettings, extra=[("deep", bool, False)])
PromptedViTConfig.renamed_fields = {"prompt_dropout": "dropout"}


def with_prompt_count(settings: Any, default: int) -> PromptSettings:
    """The :class:`PromptSettings` of ``settings`` (a ``prompt`` section, or a namespace of its fields), with
    ``num_prompts`` the method's ``default`` when unset (0 is refused, not "unset")."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(PromptSettings)}
    return PromptSettings(
        **fields | {"num_prompts": default if fields["num_prompts"] is None else fields["num_prompts"]}
    )


class PromptedViT(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with learnable prompt tokens and a new linear head.

    Token layout entering block 0: ``[prefix tokens (cls, registers) ; prompts ; patch tokens]``. Prompts are
    inserted after the position embedding and never receive one. Shallow prompts travel through all blocks;
    deep prompts replace the previous block's prompt outputs before each of the first ``deep_layers`` blocks.
    Only ``prompts`` and ``head`` are trainable; the backbone is frozen and stays in eval mode.

    Args:
        backbone: A timm ``VisionTransformer``; see :class:`~selfprompt.model.ViTClassifier`.
        num_classes, pool, head_init_std, train_backbone, backbone_name: See
            :class:`~selfprompt.model.ViTClassifier`.
        settings: Its :class:`PromptSettings` (default: ``prompt_defaults``); ``fields`` replace single ones
            by name (``num_prompts=20, dropout=0.1``).
        deep: Prompts before every block (VPT-deep) instead of once before block 0 (shallow).
    """

    config_class: ClassVar[type] = PromptedViTConfig
    #: The settings of a model built without them (subclasses: their papers' defaults).
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 10}
    needs = frozenset({"prompts"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: PromptSettings | None = None,
        *,
        deep: bool = False,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **fields: Any,
    ) -> None:
        if isinstance(settings, int) and not isinstance(settings, bool):  # the third argument of before
            warnings.warn(
                f"{type(self).__name__}(backbone, num_classes, {settings}) is now num_prompts={settings}; "
                f"the third argument is a PromptSettings.",
                FutureWarning,
                stacklevel=2,
            )
            settings, fields["num_prompts"] = None, settings
        if "prompt_dropout" in fields:
            warnings.warn(
                "PromptedViT(prompt_dropout=...) is now dropout=... (PromptSettings.dropout).",
                FutureWarning,
                stacklevel=2,
            )
            fields.setdefault("dropout", fields.pop("prompt_dropout"))
        prompt = settings_from(
            "prompt",
            PromptSettings,
            settings,
            fields,
            owner=type(self).__name__,
            defaults=self.prompt_defaults,
        )
        if prompt.num_prompts is None:
            prompt = dataclasses.replace(prompt, num_prompts=self.prompt_defaults["num_prompts"])
        if prompt.deep_layers is not None and not deep:
            raise ValueError("deep_layers applies only to deep prompts; pass deep=True or drop deep_layers.")
        super().__init__(
            backbone,
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            train_backbone=train_backbone,
            backbone_name=backbone_name,
            **dataclasses.asdict(prompt),
            deep=deep,
        )
        depth = len(self.backbone.blocks)
        layers = prompt.deep_layers
        if layers is not None and not 1 <= layers <= depth:
            raise ValueError(
                f"prompt.deep_layers must be in [1, {depth}] (the backbone's depth), got {layers}."
            )
        self.num_prompts = self.num_extra_tokens = prompt.num_prompts
        self.num_prompt_layers = (prompt.deep_layers or depth) if deep else 1
        device = next(backbone.parameters()).device
        self.prompts = nn.Parameter(
            torch.empty(self.num_prompt_layers, prompt.num_prompts, self.embed_dim, device=device)
        )
        self.prompt_dropout = nn.Dropout(prompt.dropout)
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

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The layer-0 prompts go between the prefix tokens and the patches."""
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], self._layer_prompts(0, x.shape[0]), x[:, p:]], dim=1)

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Deep prompts: the previous block's prompt outputs are replaced by this layer's prompts."""
        if 0 < index < self.num_prompt_layers:
            p, m = self.num_prefix_tokens, self.num_prompts
            x = torch.cat([x[:, :p], self._layer_prompts(index, x.shape[0]), x[:, p + m :]], dim=1)
        return self.run_block(index, block, x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: prompts and head (plus the backbone if it trains)."""
        return {"prompts": self.prompts, **super().adapter_parameters()}


PROMPT_SEARCH = Search(
    {"optim.lr": [5e-2, 1e-2, 5e-3, 1e-3], "optim.weight_decay": [1e-2, 1e-4]},
    "lr: SPT README's AdamW rates 5e-2 (MAE) and 1e-3 (supervised), BPT's 5e-3 (SPT.md 4), 1e-2 ours "
    "between; weight_decay: two of the VPT-family grid's {1e-2, 1e-3, 1e-4, 0} (docs/methods.md, VPT)",
)
register_settings(
    "prompt",
    PromptRunSettings,
    "Prompt settings of the prompt methods (vpt-*, spt-*).",
    legacy={
        "model.num_prompts": "num_prompts",
        "model.deep_layers": "deep_layers",
        "model.prompt_dropout": "dropout",
        "model.init": "init",
        "model.init_fraction": "init_fraction",
        "model.init_max_images": "init_max_images",
        "model.prompts_file": "file",
    },
)


def save_prompts_file(path: str | Path, prompts: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write a prompts file (``prompts`` (layers, M, D) and JSON ``metadata``), the format ``prompt.file``
    reads, atomically; prompts holding NaN or Inf are refused and nothing is written."""
    out = Path(path)
    check_finite({"prompts": prompts}, out, writing=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"selfprompt": json.dumps(metadata)}
    atomic_write(out, lambda p: save_file({"prompts": prompts.contiguous()}, str(p), metadata=meta))
    return out


def prompts_file_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a prompts file ({} when it has none)."""
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("selfprompt")
    return json.loads(raw) if raw else {}


def load_prompts_file(path: str, shape: torch.Size) -> torch.Tensor:
    """The prompts a ``selfprompt init-prompts`` file holds, checked against the model's shape."""
    prompts = read_tensors(path)["prompts"]
    if prompts.shape != shape:
        raise ValueError(
            f"{path} holds prompts of shape {tuple(prompts.shape)}, the model needs {tuple(shape)}."
        )
    return prompts


def prepare(
    method: Method, model: PromptedViT, settings: PromptRunSettings, loader: DataLoader, seed: int
) -> None:
    """The prompts' initial values: from ``settings.file``, or the method's initializer on ``loader``."""
    if settings.file is not None:
        with torch.no_grad():
            model.prompts.copy_(load_prompts_file(settings.file, model.prompts.shape))
        return
    initial_prompts(model, loader, method.initializer(settings.init), settings, seed)


def initial_prompts(target: nn.Module, loader: Any, init: str, settings: Any, seed: int) -> torch.Tensor:
    """``init_prompts`` of ``target`` (a model, or a :class:`~selfprompt.methods.prompt_tools.PromptPart` of
    one) by the initializer ``init``, on the images a ``prompt`` section chooses (``init_fraction``,
    ``init_max_images``) with its initializer options; sets ``target``'s prompts and returns them."""
    return init_prompts(
        target,
        loader,
        init,
        fraction=settings.init_fraction,
        max_images=settings.init_max_images,
        seed=seed,
        options=initializer_options(settings),
    )


def _builder(deep: bool):
    def build(backbone, num_classes, settings: PromptRunSettings, **common: Any) -> PromptedViT:
        prompt = with_prompt_count(settings, 20 if deep else 100)
        return PromptedViT(backbone, num_classes, prompt, deep=deep, **common)

    return build


def _check_shallow(settings: PromptRunSettings, cfg: Any) -> None:
    if settings.deep_layers is not None:
        raise ValueError(
            f"{cfg.model.method} has one prompt set, before block 0; drop prompt.deep_layers (a deep method "
            f"prompts the first k blocks with it)."
        )


for _order, (_name, _deep, _init) in enumerate(
    [
        ("vpt-shallow", False, "xavier"),
        ("vpt-deep", True, "xavier"),
        ("spt-shallow", False, "sample"),
        ("spt-deep", True, "sample"),
    ]
):
    _placement = "deep" if _deep else "shallow"
    register_method(
        _name,
        f"{'VPT' if _init == 'xavier' else 'SPT'}-{_placement}: prompts "
        f"{'before every block' if _deep else 'once, before block 0'}, initialised "
        f"{'at random (xavier)' if _init == 'xavier' else 'from patch-token prototypes'}",
        PromptedViT,
        _builder(_deep),
        settings="prompt",
        check=None if _deep else _check_shallow,
        default_init=_init,
        inits=("xavier",) if _init == "xavier" else None,
        other_inits=f"spt-{_placement}",
        prepare=prepare,
        order=2 + _order,
        search=PROMPT_SEARCH,
        shares_backbone=True,
    )
