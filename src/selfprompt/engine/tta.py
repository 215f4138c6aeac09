"""Test-time prompt tuning (TPT; Shu et al., NeurIPS 2022) for any selfprompt model with prompts.

For each test image on its own: ``views - 1`` random resized crops of it plus the image itself go through the
model; the ``keep`` share of views with the lowest prediction entropy is kept; the prompts take ``steps``
AdamW steps (a fresh optimizer per image) that minimise the entropy of the kept views' averaged
prediction; then the image itself is predicted and the prompts are restored, so every image starts from
the stored adapter and the adapter never changes. Only ``model.prompts`` moves (the head and everything else
stay as trained). The views of an image form one batch; images run one after another, since each tunes its
own copy of the prompts. Crops only, no flips: several VTAB tasks (locations, orientations) change class
under a flip. With ``steps = 0`` it is plain prediction on each image.
"""

from __future__ import annotations

import math

from selfprompt.tta_config import TPTConfig

import torch
from torch import nn
from torchvision.transforms import v2

__all__ = ["PromptTuner", "TPTConfig"]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """The entropy of each distribution given by its log-probabilities (last dimension)."""
    return -(logp.exp() * logp).sum(dim=-1)


class PromptTuner(nn.Module):
    """TPT around a model: ``tuner(images)`` gives each image's logits after tuning the prompts on it (a
    drop-in for the model wherever logits are wanted, e.g. :func:`selfprompt.engine.evaluate`)."""

    def __init__(self, model: nn.Module, config: TPTConfig | None = None, seed: int = 0) -> None:
        prompts = getattr(model, "prompts", None)
        if not isinstance(prompts, nn.Parameter):
            raise ValueError(
                f"TPT tunes prompts and {type(model).__name__} has none: use a prompt method's run "
                f"(vpt-*, spt-*, ...) or predict without --tta."
            )
        super().__init__()
        self.model = model
        self.config = config or TPTConfig()
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def prompts(self) -> nn.Parameter:
        return self.model.prompts

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """``(views, C, H, W)``: the image, then random resized crops of it (area share in ``[min_scale,
        1]``, aspect ratio in [3/4, 4/3]) resized back to its size, drawn from TPT's own seed."""
        height, width = image.shape[-2:]
        out = [image]
        for _ in range(self.config.views - 1):
            share, log_ratio = torch.rand(2, generator=self.generator, dtype=torch.float64).tolist()
            area = height * width * (self.config.min_scale + (1 - self.config.min_scale) * share)
            ratio = math.exp(math.log(3 / 4) + log_ratio * math.log(16 / 9))
            w = min(width, max(1, round(math.sqrt(area * ratio))))
            h = min(height, max(1, round(math.sqrt(area / ratio))))
            top = int(torch.randint(height - h + 1, (), generator=self.generator))
            left = int(torch.randint(width - w + 1, (), generator=self.generator))
            out.append(v2.functional.resized_crop(image, top, left, h, w, [height, width], antialias=True))
        return torch.stack(out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.tune_and_predict(image) for image in images])

    def tune_and_predict(self, image: torch.Tensor) -> torch.Tensor:
        """The image's ``(num_classes,)`` logits after its own TPT steps; the prompts are restored after."""
        cfg, model = self.config, self.model
        saved = self.prompts.detach().clone()
        was_training, grads = model.training, {p: p.requires_grad for p in model.parameters()}
        model.eval()
        try:
            if cfg.steps:
                for p in model.parameters():
                    p.requires_grad_(p is self.prompts)
                views = self.views(image)
                keep = max(1, int(cfg.keep * len(views)))
                optimizer = torch.optim.AdamW([self.prompts], lr=cfg.lr, weight_decay=0.0)
                for _ in range(cfg.steps):
                    with torch.enable_grad():
                        logp = model(views).float().log_softmax(dim=-1)
                        confident = _entropy(logp.detach()).topk(keep, largest=False).indices
                        # the log of the kept views' mean prediction, computed in log space
                        mean = logp[confident].logsumexp(dim=0) - math.log(keep)
                        _entropy(mean).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                return model(image[None])[0]
        finally:
            with torch.no_grad():
                self.prompts.copy_(saved)
            self.prompts.grad = None
            for p, flag in grads.items():
                p.requires_grad_(flag)
            model.train(was_training)
