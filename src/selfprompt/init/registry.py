"""Prompt initializers by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from selfprompt.init.collect import BlockInput


class PromptInitializer:
    """Builds one layer's ``(M, D)`` prompts, streaming over that layer's patch tokens batch by batch.

    Subclasses set ``needs_tokens = False`` when they ignore the data (``update`` is then never called), and
    ``reads_blocks = True`` when they need the whole sequence entering the layer's block and the block itself
    (``update_block`` is then called instead of ``update``; models whose prompts are built from other tokens,
    with a ``prompt_tokens_by_layer``, refuse them). Their own options (``options``: the keyword arguments
    their constructor takes besides the model, generator and ``max_tokens``) come from ``init_prompts``.
    """

    needs_tokens: ClassVar[bool] = True
    reads_blocks: ClassVar[bool] = False
    #: The options the constructor takes, by keyword; what ``init_prompts(..., options=...)`` may pass.
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, *, generator: torch.Generator, max_tokens: int) -> None:
        self.num_prompts = model.num_prompts
        self.generator = generator
        self.max_tokens = max_tokens

    def update(self, tokens: torch.Tensor) -> None:
        """Consume a batch of patch tokens laid out on their grid, shape ``(B, H, W, D)``, float32."""

    def update_block(self, inputs: BlockInput) -> None:
        """Consume a batch of the sequence entering the layer's block (``reads_blocks`` initializers)."""

    def result(self) -> torch.Tensor:
        """The layer's prompts, shape ``(M, D)``."""
        raise NotImplementedError


_REGISTRY: dict[str, type[PromptInitializer]] = {}


def register_initializer(name: str):
    """Class decorator adding a :class:`PromptInitializer` to the registry under ``name``."""

    def add(cls: type[PromptInitializer]) -> type[PromptInitializer]:
        if name in _REGISTRY:
            raise ValueError(f"A prompt initializer named {name!r} is already registered.")
        _REGISTRY[name] = cls
        return cls

    return add


def available_initializers() -> list[str]:
    return sorted(_REGISTRY)


def get_initializer(name: str) -> type[PromptInitializer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown prompt init method {name!r}; known: {', '.join(available_initializers())}."
        ) from None
