"""``selfprompt meta-prompts``: a prompt initialisation meta-learned across source tasks with Reptile.

Reptile (Nichol et al., 2018) is first-order: each iteration trains a copy of the meta prompts ``theta`` on
one source task for ``inner_steps`` steps (AdamW, the recipe's learning rate and weight decays, a fresh
optimizer each visit), giving ``phi``, then moves ``theta <- theta + eps * (phi - theta)`` with ``eps``
decaying linearly from ``meta_lr`` to 0. Why Reptile: it needs no second derivatives through the ViT (MAML
does) and no support/query split of the small training sets, and the source tasks may have different
class counts, since each keeps its own head across visits (only the prompts are shared). The tasks are
visited in a seeded random order, every task once per round. ``theta`` starts from VPT's xavier draw of the
same seed, so what it gains comes from the sources alone. Only the sources' training splits are read.

The result is a prompts file (``--prompt.file``). With ``meta_lr`` 0 it is the xavier draw; with one
iteration and ``meta_lr`` 1 it is the prompts after ``inner_steps`` steps on the first task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from selfprompt.config import TrainConfig
from selfprompt.data.splits import build_splits
from selfprompt.engine.build import backbone_name, build_model, create_backbone, method_settings
from selfprompt.engine.loop import classification_loss
from selfprompt.engine.optim import build_optimizer
from selfprompt.init import init_prompts
from selfprompt.methods.prompt import save_prompts_file

import torch
from torch.utils.data import DataLoader


def _batches(dataset, batch_size: int, generator: torch.Generator) -> Iterator:
    """Endless shuffled batches (a new seeded order every pass; the last short batch dropped)."""
    while True:
        yield from DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
        )


def meta_prompts(
    cfg: TrainConfig,
    sources: Sequence[str | Path],
    output: str | Path,
    iterations: int = 200,
    inner_steps: int = 5,
    meta_lr: float = 1.0,
    seed: int = 0,
    log=print,
) -> torch.Tensor:
    """Meta-learn ``cfg``'s prompts over the tasks whose data roots are ``sources`` and save them."""
    if not sources:
        raise ValueError("meta-prompts needs at least one source task (--sources ROOT ...).")
    if iterations < 1 or inner_steps < 1:
        raise ValueError(f"iterations and inner_steps must be >= 1, got {iterations} and {inner_steps}.")
    if not 0 <= meta_lr <= 1:
        raise ValueError(f"meta_lr must be in [0, 1], got {meta_lr}.")
    method, _ = method_settings(cfg)
    if not method.has_prompts:
        raise ValueError(
            f"method {method.name!r} has no prompts; meta-learn a prompt method's (e.g. vpt-deep)."
        )
    backbone = create_backbone(cfg.model).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for root in sources:
        task_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
        splits = build_splits(task_cfg.data, backbone, seed)
        torch.manual_seed(seed)
        model = build_model(task_cfg, backbone, len(splits.classes))
        tasks.append((model, _batches(splits.train, cfg.data.batch_size, generator)))
    theta = init_prompts(tasks[0][0], None, "xavier", seed=seed).clone()
    order = _visits(len(tasks), generator)
    for it in range(iterations):
        model, batches = tasks[next(order)]
        with torch.no_grad():
            model.prompts.copy_(theta)
        model.train()
        optimizer = build_optimizer(model, cfg.optim)
        for _ in range(inner_steps):
            images, labels = next(batches)
            classification_loss(model, images, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        eps = meta_lr * (1 - it / iterations)
        theta += eps * (model.prompts.detach() - theta)
        if (it + 1) % max(1, iterations // 10) == 0:
            log(f"[meta-prompts] iteration {it + 1}/{iterations}, meta step {eps:.3f}")
    metadata = {
        "method": "meta",
        "algorithm": "reptile",
        "backbone": backbone_name(backbone),
        "sources": [str(s) for s in sources],
        "iterations": iterations,
        "inner_steps": inner_steps,
        "meta_lr": meta_lr,
        "seed": seed,
        "shape": list(theta.shape),
    }
    save_prompts_file(output, theta, metadata)
    log(f"meta-learned prompts {tuple(theta.shape)} over {len(sources)} task(s) -> {output}")
    return theta


def _visits(count: int, generator: torch.Generator) -> Iterator[int]:
    """Task indices: a seeded random permutation per round."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()
