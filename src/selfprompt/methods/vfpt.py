"""VFPT: visual Fourier prompt tuning (Zeng et al., NeurIPS 2024), written from docs/methods.md, VFPT
(official code runtsang/VFPT, CC BY-NC 4.0; none of it is copied).

VPT-deep whose first m = floor(alpha * N) prompts of every layer (layer 0 included) enter the block as
Re(FFT_seq(FFT_hidden(dropout(P[:m])))): an unnormalised (``norm="backward"``) 1-D FFT over the hidden dim,
then over the sequence of those m prompts only, real part kept. Order: [prefix, Fourier prompts, plain
prompts, patches]. The FFT has no parameters: 12 * N * D + head (N=10 on ViT-B/16, 100 classes: 169,060).

SPT initialisation (docs/methods.md, SPT) applies to the plain (1 - alpha) share, built as spt-deep's
prompts of the same layers; the Fourier share keeps the random (xavier) draw, since Re(FFT2) is not
invertible. With alpha = 1 there is no plain share and a token initializer is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from selfprompt.init import init_prompts
from selfprompt.init.registry import get_initializer
from selfprompt.methods import prompt
from selfprompt.methods.prompt import (
    PROMPT_SEARCH,
    PromptedViT,
    PromptedViTConfig,
    PromptRunSettings,
    PromptSettings,
    with_prompt_count,
)
from selfprompt.methods.prompt_tools import PromptPart
from selfprompt.methods.registry import Method, register_method, register_settings
from selfprompt.methods.settings import adapter_config, number_problem, settings_from

import torch
from torch import nn
from torch.utils.data import DataLoader


def fourier_prompts(prompts: torch.Tensor) -> torch.Tensor:
    """Re(FFT over the sequence (dim -2) of the FFT over the hidden dim (dim -1)), unnormalised, computed in
    float32 and returned in ``prompts``' dtype."""
    spectrum = torch.fft.fft(torch.fft.fft(prompts.float(), dim=-1, norm="backward"), dim=-2, norm="backward")
    return spectrum.real.to(prompts.dtype)


@dataclass
class VFPTSettings:
    """VFPT's own settings (the prompts' count, init and dropout are the ``prompt`` section's).

    Attributes:
        fourier_share: alpha: the first floor(alpha * N) prompts of each layer are Fourier prompts (official
            config default 0.5; per-task values in the authors' sheet). SPT inits need alpha * N < N.
    """

    fourier_share: float = 0.5

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        return number_problem("fourier_share", self.fourier_share, 0, 1, "in [0, 1]", high_open=False)


#: What a VFPT adapter stores: PromptedViTConfig's fields (deep) plus VFPTSettings'.
VFPTConfig = adapter_config(VFPTSettings, PromptedViTConfig)


class VFPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with VPT-deep prompts, the first floor(alpha * N) of each layer
    through a 2-D FFT. Args: as :class:`PromptedViT` (deep; its :class:`PromptSettings` as ``prompt``) plus
    its :class:`VFPTSettings` (``settings``); ``fields`` by name go to either."""

    config_class = VFPTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 10, "dropout": 0.1}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: VFPTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        deep: bool = True,
        **fields: Any,
    ) -> None:
        if not deep:
            raise ValueError("VFPT's prompts are deep; deep must be True.")
        settings = settings_from("vfpt", VFPTSettings, settings, fields)
        super().__init__(backbone, num_classes, prompt, deep=True, **fields)
        self.config.fourier_share = settings.fourier_share
        self.num_fourier = math.floor(settings.fourier_share * self.num_prompts)

    def _layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        prompts = super()._layer_prompts(layer, batch)
        m = self.num_fourier
        if not m:
            return prompts
        return torch.cat([fourier_prompts(prompts[:, :m]), prompts[:, m:]], dim=1)


register_settings("vfpt", VFPTSettings, "VFPT's Fourier share (with the prompt section).")


def _refuse_all_fourier(init: str) -> None:
    raise ValueError(
        f"vfpt with prompt.init={init!r}: every prompt is a Fourier prompt (vfpt.fourier_share gives "
        f"floor(alpha * N) = N), and Fourier prompts cannot be initialised from tokens (Re(FFT2) is not "
        f"invertible); lower vfpt.fourier_share or use prompt.init xavier."
    )


def _token_init(init: str | None) -> bool:
    return init is not None and get_initializer(init).needs_tokens


def _check(settings: Any, cfg: Any) -> None:
    num_prompts = with_prompt_count(settings, 10).num_prompts
    if _token_init(settings.init) and math.floor(settings.vfpt.fourier_share * num_prompts) >= num_prompts:
        _refuse_all_fourier(settings.init)


def prepare(method: Method, model: VFPT, settings: PromptRunSettings, loader: DataLoader, seed: int) -> None:
    """A prompts file or xavier: as :func:`selfprompt.methods.prompt.prepare`. A token initializer: xavier
    for every prompt, then the plain share from the initializer (as spt-deep's prompts)."""
    init = method.initializer(settings.init)
    if settings.file is not None or not _token_init(init):
        prompt.prepare(method, model, settings, loader, seed)
        return
    m = model.num_fourier
    if m >= model.num_prompts:
        _refuse_all_fourier(init)
    init_prompts(model, None, "xavier", seed=seed)
    view = PromptPart(model, model.num_prompts - m, model.num_prompt_layers)
    plain = prompt.initial_prompts(view, loader, init, settings, seed)
    with torch.no_grad():
        model.prompts[:, m:].copy_(plain)


def _build(backbone, num_classes, settings: Any, **common: Any) -> VFPT:
    return VFPT(backbone, num_classes, settings.vfpt, prompt=with_prompt_count(settings, 10), **common)


register_method(
    "vfpt",
    "VFPT: VPT-deep with the first share of each layer's prompts through a 2-D FFT (real part)",
    VFPT,
    _build,
    settings="prompt",
    extra_settings=("vfpt",),
    check=_check,
    default_init="xavier",
    prepare=prepare,
    search=PROMPT_SEARCH,
    order=22,
)
