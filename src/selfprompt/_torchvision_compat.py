"""Make ``import torchvision`` (and so ``import timm``) work when its C extension cannot load.

PyPI's torchvision wheels are CUDA builds; beside a CPU-only torch their ``_C`` library fails to load and
torchvision's meta registrations then raise ``operator torchvision::nms does not exist`` on import. Before
torchvision is first imported we try to load its library; only if that fails do we declare the two operator
schemas it registers meta kernels for. Detection ops then raise when called; nothing selfprompt uses needs
them. On a matching build the library loads and nothing else happens.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_fallback_library: torch.library.Library | None = None  # must stay alive for the schemas to stay defined


def ensure_torchvision_importable() -> None:
    global _fallback_library
    if "torchvision" in sys.modules or _fallback_library is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for lib in sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return
        except OSError:
            continue
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _fallback_library.define(op + _SCHEMA)
