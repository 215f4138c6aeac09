"""``import timm`` (or torchvision) before ``import selfprompt`` works in a fresh interpreter beside a
CPU-only torch: the start-up hook that an install puts in site-packages (``src/selfprompt-torchvision.pth``,
run here by ``site.addsitedir`` as site-packages' .pth files are at start-up) runs selfprompt's torchvision
guard just before torchvision is first imported, and imports nothing else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
GUARD = "selfprompt._torchvision_compat"


def _run(code: str) -> str:
    prelude = f"import site, sys; site.addsitedir({str(SRC)!r}); "
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_hook_alone_imports_neither_torch_nor_selfprompt():
    out = _run(
        "print(sorted(m for m in ('torch', 'torchvision', 'selfprompt', 'timm') if m in sys.modules), "
        "[getattr(f, '__name__', None) for f in sys.meta_path][0])"
    )
    assert out.split() == ["[]", "_BeforeTorchvision"]


@pytest.mark.slow
def test_timm_first_then_selfprompt():
    """The README's order; timm's import runs the guard and does not import selfprompt."""
    _run(
        f"import timm; assert {GUARD!r} in sys.modules and 'selfprompt' not in sys.modules; "
        "import selfprompt, torch; "
        "timm.create_model('vit_tiny_patch16_224', num_classes=2)(torch.zeros(1, 3, 224, 224))"
    )


@pytest.mark.slow
def test_torchvision_first_then_timm_and_selfprompt():
    _run("import torchvision.transforms; import timm; import selfprompt; torchvision.transforms.ToTensor()")
