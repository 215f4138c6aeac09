"""SubPT's gradient-subspace projection of the prompts (Ma et al., CVPR 2023), for any method with prompts.

The first ``steps`` optimizer steps train as usual and define, for each prompted layer, the subspace its
prompt gradients moved in: the top ``rank`` eigenvectors ``V`` (D x rank) of the sum over those steps of
``G^T G``, where ``G`` is the layer's ``(M, D)`` prompt gradient (i.e. the top right singular vectors of all
early gradient rows stacked). From then on each layer's gradient is replaced by its projection ``G V V^T``
before clipping and the optimizer step, so the prompts only move along early-training directions, which
curbs overfitting on few images. The head's gradient is never projected. ``rank = D`` is the whole space: the
projection is the identity up to float rounding. The sums and the bases are part of the resumable state.
"""

from __future__ import annotations

from selfprompt.config import OptimConfig

import torch
from torch import nn


class GradientSubspace:
    """Records then projects the gradient of ``prompts`` (``(layers, M, D)``), once per optimizer step."""

    def __init__(self, prompts: nn.Parameter, rank: int, steps: int) -> None:
        dim = prompts.shape[-1]
        if not 1 <= rank <= dim:
            raise ValueError(f"optim.subspace_rank must be in 1..{dim} (the prompts' width), got {rank}.")
        if steps < 1:
            raise ValueError(f"optim.subspace_steps must be >= 1, got {steps}.")
        self.prompts, self.rank, self.steps = prompts, rank, steps
        self.seen = 0
        layers = prompts.shape[0]
        self.gram = torch.zeros(layers, dim, dim, dtype=torch.float64, device=prompts.device)
        self.basis: torch.Tensor | None = None  # (layers, D, rank) once ``steps`` steps were seen

    @torch.no_grad()
    def step(self) -> None:
        """Call after an optimizer step's backward pass(es), before clipping and ``optimizer.step``."""
        grad = self.prompts.grad
        if grad is None:
            return
        if self.basis is None:
            g = grad.double()
            self.gram += g.transpose(1, 2) @ g
            self.seen += 1
            if self.seen == self.steps:
                _, vectors = torch.linalg.eigh(self.gram)  # ascending eigenvalues
                self.basis = vectors[:, :, -self.rank :].to(grad.dtype).contiguous()
            return
        grad.copy_(self.project(grad))

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (layers, M, D) projected onto each layer's subspace."""
        if self.basis is None:
            raise RuntimeError(f"The subspace is defined after {self.steps} steps; {self.seen} were seen.")
        return (grad @ self.basis) @ self.basis.transpose(1, 2)

    def state_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "gram": self.gram, "basis": self.basis}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.seen = int(state["seen"])
        self.gram.copy_(state["gram"])
        basis = state["basis"]
        self.basis = None if basis is None else basis.to(self.prompts.device, self.prompts.dtype)


def gradient_subspace(model: nn.Module, cfg: OptimConfig) -> GradientSubspace | None:
    """The run's projection (``optim.subspace_rank``), or None when it is off."""
    if cfg.subspace_rank is None:
        return None
    prompts = getattr(model, "prompts", None)
    if not isinstance(prompts, nn.Parameter) or prompts.ndim != 3:
        raise ValueError(
            f"optim.subspace_rank projects prompt gradients, and {type(model).__name__} has no prompts: "
            f"use a prompt method (e.g. vpt-deep, spt-deep) or set optim.subspace_rank null."
        )
    return GradientSubspace(prompts, cfg.subspace_rank, cfg.subspace_steps)
