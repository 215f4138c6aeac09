"""Exponential moving average of the trained parameters only (never a copy of a frozen backbone)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ParameterEMA:
    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}.")
        self.params = params
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Swap the averaged values into the model for the duration of the block."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k])
        try:
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(saved[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
