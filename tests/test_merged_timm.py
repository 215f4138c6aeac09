"""A merged LoRA or SSF model is a plain timm classifier that timm itself saves and rebuilds: through
`save_for_hf` and `create_model("local-dir:...")` it gives the adapter's logits, for every pooling."""

import selfprompt  # noqa: F401  (before timm)
from selfprompt.methods.lora import LoRA
from selfprompt.methods.ssf import SSF

import pytest
import timm
import torch
from timm.models._hub import save_for_hf

TOLERANCE = 1e-5  # a rebuilt model's float32 logits; measured up to 2.4e-7


@pytest.mark.parametrize("pool", ["token", "avg", "mae"])
@pytest.mark.parametrize("method", [LoRA, SSF], ids=lambda c: c.__name__)
def test_save_for_hf_rebuilds_the_merged_model(method, pool, images, tmp_path):
    backbone = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    model = method(backbone, 5, pool=pool).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    save_for_hf(model.merged(), str(tmp_path))
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=TOLERANCE)
