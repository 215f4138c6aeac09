"""Prompt Condensation's whole life: the condensed model and method ``pc`` (:mod:`.model`) and its second
stage, ``selfprompt condense`` (:mod:`.condense`), registered here together."""

from __future__ import annotations

from selfprompt.methods.condensation.condense import CONDENSE
from selfprompt.methods.condensation.model import (
    CondensedViT,
    CondensedViTConfig,
    CondensedViTSettings,
    _build,
    _check,
    condense,
    condense_at_random,
    kept_mask,
    prompt_importance,
)
from selfprompt.methods.registry import register_method

register_method(
    "pc",
    "Prompt Condensation: fine-tune the best share of a trained vpt-deep/spt-deep model's prompts",
    CondensedViT,
    _build,
    settings="condense",
    check=_check,
    order=30,
    condenses="vpt-deep",
    commands=(CONDENSE,),
)

__all__ = [
    "CondensedViT",
    "CondensedViTConfig",
    "CondensedViTSettings",
    "condense",
    "condense_at_random",
    "kept_mask",
    "prompt_importance",
]
