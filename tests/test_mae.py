from selfprompt import PromptedViT
from selfprompt.pretrain import MaskedAutoencoder, patchify, random_masking, unpatchify

import pytest
import torch
from conftest import tiny_vit
from timm.models.vision_transformer import VisionTransformer


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stripes(n: int = 16) -> torch.Tensor:
    """Oriented sinusoidal stripes, a different angle, frequency and phase per image and channel."""
    g = gen(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    angle, freq = torch.rand(n, generator=g) * torch.pi, 2 + 4 * torch.rand(n, generator=g)
    phase = torch.rand(n, 3, 1, 1, generator=g) * 2 * torch.pi
    u = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]
    return torch.sin(2 * torch.pi * freq[:, None, None, None] * u[:, None] + phase)


def mae(seed: int = 0, **kwargs) -> MaskedAutoencoder:
    encoder_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("mask_ratio", "norm_pix_loss")}
    torch.manual_seed(seed)
    return MaskedAutoencoder(tiny_vit(seed, **encoder_kwargs), decoder_dim=32, decoder_heads=2, **kwargs)


def test_patchify_round_trip(images):
    patches = patchify(images, 4)
    assert patches.shape == (6, 64, 48)
    assert torch.equal(patches[0, 1], images[0, :, :4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4), images)
    rect = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(rect, (4, 2)), (4, 2), grid_size=(2, 6)), rect)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(images, 5)


def test_patch_order_matches_patch_embed(images):
    """patchify's patch order is the ViT's token order: a linear patch embedding reproduces patch_embed."""
    pe = tiny_vit().patch_embed
    weight = pe.proj.weight.permute(0, 2, 3, 1).reshape(pe.proj.out_channels, -1)
    expected = patchify(images, 4) @ weight.T + pe.proj.bias
    assert torch.allclose(pe(images), expected, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_masking_counts_and_determinism(ratio):
    model = mae(mask_ratio=ratio)
    keep = round((1 - ratio) * 64)
    tokens = torch.randn(8, 64, 5)
    kept, mask, ids_restore = random_masking(tokens, keep, gen(3))
    assert kept.shape == (8, keep, 5)
    assert torch.equal((mask == 0).sum(1), torch.full((8,), keep))
    assert len({tuple(m.tolist()) for m in mask}) == 8  # differs across samples
    # kept tokens are exactly the unmasked ones, in some order
    for b in range(8):
        assert torch.equal(kept[b].sort(0).values, tokens[b][mask[b] == 0].sort(0).values)
    _, mask_again, restore_again = random_masking(tokens, keep, gen(3))
    assert torch.equal(mask, mask_again) and torch.equal(ids_restore, restore_again)
    m1 = model(stripes(4), gen(5))[2]
    assert torch.equal(m1, model(stripes(4), gen(5))[2])
    assert not torch.equal(m1, model(stripes(4), gen(6))[2])
    assert torch.equal(m1.sum(1), torch.full((4,), 64.0 - keep))


def test_loss_ignores_kept_patches():
    model = mae()
    images = stripes(4)
    loss, pred, mask = model(images, gen(0))
    pred = pred.detach().requires_grad_(True)
    model.reconstruction_loss(images, pred, mask).backward()
    per_patch = pred.grad.abs().sum(-1)
    assert torch.all(per_patch[mask == 0] == 0) and torch.all(per_patch[mask == 1] > 0)
    # with predictions fixed, changing the pixels of a kept patch leaves the loss alone; a masked one does not
    kept_idx, masked_idx = (mask[0] == 0).nonzero()[0, 0].item(), (mask[0] == 1).nonzero()[0, 0].item()
    for idx, changes in ((kept_idx, False), (masked_idx, True)):
        patches = patchify(images, 4)
        patches[0, idx] = torch.randn(48)
        changed = model.reconstruction_loss(unpatchify(patches, 4), pred, mask)
        assert (not torch.isclose(changed, loss)) == changes


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_training_lowers_loss(norm_pix_loss):
    model = mae(norm_pix_loss=norm_pix_loss).train()
    images = stripes(16)
    with torch.no_grad():
        before = model(images, gen(123))[0].item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(30):
        loss = model(images, gen(step))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(images, gen(123))[0].item()
    # measured on CPU: 1.88 -> 0.99 (norm_pix_loss), 1.40 -> 0.51 (raw); about the predict-the-mean level
    assert after < 0.75 * before


@pytest.mark.parametrize(
    "encoder_kwargs",
    [
        {},
        {"class_token": False, "reg_tokens": 4, "global_pool": "avg", "no_embed_class": True},
        {"reg_tokens": 2},
    ],
    ids=["cls", "registers", "cls+registers"],
)
def test_encoder_state_dict_becomes_backbone(encoder_kwargs, images):
    model = mae(**encoder_kwargs)
    loss, pred, mask = model(images, gen(0))
    assert loss.isfinite() and pred.shape == (6, 64, 48) and mask.shape == (6, 64)
    state = model.encoder_state_dict()
    fresh = tiny_vit(seed=7, **encoder_kwargs)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    prompted = PromptedViT(fresh, num_classes=3, num_prompts=2)
    assert prompted(images).shape == (6, 3)


def test_encoder_head_is_left_out():
    model = mae(num_classes=10)
    assert not any(k.startswith("head.") for k in model.encoder_state_dict())
    tiny_vit().load_state_dict(model.encoder_state_dict(), strict=True)


def test_bad_arguments():
    with pytest.raises(TypeError, match="VisionTransformer"):
        MaskedAutoencoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        MaskedAutoencoder(tiny_vit(dynamic_img_size=True))
    for ratio in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
            MaskedAutoencoder(tiny_vit(), mask_ratio=ratio)
    with pytest.raises(ValueError, match="keeps 0 of 64"):
        MaskedAutoencoder(tiny_vit(), mask_ratio=0.995)
    with pytest.raises(ValueError, match="decoder_heads"):
        MaskedAutoencoder(tiny_vit(), decoder_dim=30, decoder_heads=4)
    with pytest.raises(ValueError, match="decoder_depth"):
        MaskedAutoencoder(tiny_vit(), decoder_depth=0)


def test_plain_timm_vit():
    encoder = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    loss, pred, mask = MaskedAutoencoder(encoder, norm_pix_loss=False)(torch.rand(2, 3, 32, 32))
    assert loss.isfinite() and pred.shape == (2, 64, 48) and mask.sum() == 2 * 48
