"""Masked-autoencoder pretraining (He et al., 2022) of any timm ``VisionTransformer`` encoder."""

from __future__ import annotations

from selfprompt.backbones import backbone_family

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def patchify(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` images to ``(B, N, ph * pw * C)`` patches, row-major like a ViT's patch tokens.

    Each patch vector is ordered (row, column, channel) within the patch.
    """
    ph, pw = _pair(patch_size)
    b, c, h, w = images.shape
    if h % ph or w % pw:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}.")
    gh, gw = h // ph, w // pw
    x = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, ph * pw * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int | tuple[int, int], grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`; ``grid_size`` (rows, columns) defaults to a square grid."""
    ph, pw = _pair(patch_size)
    b, n, d = patches.shape
    if grid_size is None:
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid_size=(rows, columns).")
        grid_size = (side, side)
    gh, gw = grid_size
    if gh * gw != n or d % (ph * pw):
        raise ValueError(
            f"Patches of shape {tuple(patches.shape)} do not fit grid {grid_size}, patch {ph}x{pw}."
        )
    c = d // (ph * pw)
    x = patches.reshape(b, gh, gw, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * ph, gw * pw)


def random_masking(
    tokens: torch.Tensor, num_keep: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``num_keep`` random tokens per sample (argsort of uniform noise).

    Returns:
        The kept tokens ``(B, num_keep, D)``, the mask ``(B, N)`` (1 = masked, 0 = kept, in the original
        order) and ``ids_restore`` ``(B, N)``, which unshuffles ``[kept ; masked]`` into the original order.
    """
    b, n, d = tokens.shape
    gen_device = generator.device if generator is not None else tokens.device
    noise = torch.rand(b, n, generator=generator, device=gen_device).to(tokens.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = tokens.gather(1, ids_shuffle[:, :num_keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :num_keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ``VisionTransformer``: mask patch tokens, encode the visible ones, reconstruct.

    The encoder's own ``patch_embed`` and ``_pos_embed`` (class/register tokens, ``no_embed_class``) are used;
    only patch tokens are masked, prefix tokens always stay. The encoder's classifier head (if any) is unused
    and left out of :meth:`encoder_state_dict`.

    Args:
        encoder: A timm ``VisionTransformer`` with a fixed image size (``dynamic_img_size=False``).
        decoder_dim, decoder_depth, decoder_heads: Width, blocks and heads of the light decoder.
        mask_ratio: Fraction of patch tokens masked per sample, in (0, 1).
        norm_pix_loss: Reconstruct per-patch normalised pixels (mean 0, variance 1) instead of raw pixels.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"encoder must be a timm VisionTransformer, got {type(encoder).__name__}.")
        if encoder.dynamic_img_size:
            raise ValueError("encoder must have a fixed image size; create it with dynamic_img_size=False.")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        for name, value in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not isinstance(decoder_heads, int) or decoder_heads < 1 or decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_heads ({decoder_heads}) must be >= 1 and divide decoder_dim ({decoder_dim})."
            )
        self.grid_size: tuple[int, int] = tuple(encoder.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_keep = round((1.0 - mask_ratio) * self.num_patches)
        if not 1 <= self.num_keep < self.num_patches:
            raise ValueError(
                f"mask_ratio={mask_ratio} keeps {self.num_keep} of {self.num_patches} patches; "
                "it must keep at least one and mask at least one."
            )
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size: tuple[int, int] = _pair(encoder.patch_embed.patch_size)
        self.in_chans: int = encoder.patch_embed.proj.in_channels
        self.num_prefix_tokens: int = encoder.num_prefix_tokens

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed(list(self.grid_size), dim=decoder_dim)
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *(Block(decoder_dim, decoder_heads, qkv_bias=True) for _ in range(decoder_depth))
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        ph, pw = self.patch_size
        self.decoder_pred = nn.Linear(decoder_dim, ph * pw * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward_encoder(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible tokens: ``(latent [prefix ; kept patches], mask, ids_restore)``."""
        enc, p = self.encoder, self.num_prefix_tokens
        family = backbone_family(enc)
        x = family.embed_tokens(enc, family.embed_patches(enc, images), patch_drop=False)  # masking drops
        kept, mask, ids_restore = random_masking(x[:, p:], self.num_keep, generator)
        x = family.pre_blocks(enc, torch.cat([x[:, :p], kept], dim=1))
        x = enc.norm(enc.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``(B, N, ph * pw * C)`` for every patch, in the original patch order."""
        p = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, kept, d = x[:, p:].shape
        patches = torch.cat([x[:, p:], self.mask_token.expand(b, self.num_patches - kept, d)], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, d)) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(torch.cat([x[:, :p], patches], dim=1)))
        return self.decoder_pred(x[:, p:])

    def reconstruction_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only (targets per-patch normalised if norm_pix_loss)."""
        target = patchify(images, self.patch_size).detach()
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred (B, N, ph * pw * C), mask (B, N), 1 = masked)``; ``generator`` fixes the masks."""
        latent, mask, ids_restore = self.forward_encoder(images, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.reconstruction_loss(images, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights without its classifier head: loads strictly into the same config with
        ``num_classes=0`` (e.g. ``timm.create_model(name, num_classes=0)``), ready for PromptedViT."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("head.")}
