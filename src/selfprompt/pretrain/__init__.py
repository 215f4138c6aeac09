"""Self-supervised pretraining of timm ViT encoders (masked autoencoders)."""

from __future__ import annotations

from selfprompt.pretrain.mae import MaskedAutoencoder, patchify, random_masking, unpatchify

__all__ = ["MaskedAutoencoder", "patchify", "random_masking", "unpatchify"]
