"""E2VPT's whole life: the model, its settings and SPT initialisation (:mod:`.model`) and its second stage,
``selfprompt prune`` (:mod:`.prune`), registered here together."""

from __future__ import annotations

from selfprompt.methods.e2vpt.model import (
    E2VPT,
    E2VPTConfig,
    E2VPTRunSettings,
    E2VPTSettings,
    _build,
    _check,
    _resolve,
    mask_importance,
    prepare,
    pruning_masks,
    read_pruning,
)
from selfprompt.methods.e2vpt.prune import PRUNE
from selfprompt.methods.prompt import PROMPT_SEARCH
from selfprompt.methods.registry import register_method

register_method(
    "e2vpt",
    "E2VPT: VPT-deep visual prompts plus key-value prompts prepended to every block's keys and values",
    E2VPT,
    _build,
    settings="prompt",
    extra_settings=("e2vpt",),
    check=_check,
    resolve=_resolve,
    default_init="xavier",
    prepare=prepare,
    search=PROMPT_SEARCH,
    order=21,
    commands=(PRUNE,),
)

__all__ = [
    "E2VPT",
    "E2VPTConfig",
    "E2VPTRunSettings",
    "E2VPTSettings",
    "mask_importance",
    "pruning_masks",
    "read_pruning",
]
