"""Runs one README code block as written, in this fresh interpreter, as an installed selfprompt would: the
start-up hook of ``src/selfprompt-torchvision.pth`` active, and a tiny stand-in for every backbone the block
asks timm for by a hub name (nothing can be downloaded here). The stand-in keeps the name, its family and
pretrained config and is seeded, so every block that asks for the name gets the same weights, as a
pretrained download would. Nothing is imported before the block's own imports: ``timm`` is patched when the
block first imports it. Used by ``tests/test_readme.py``: ``python -c "import readme_standins as r;
r.run(SRC, BLOCK)"``."""

import runpy
import site
import sys

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def run(src: str, block: str) -> None:
    site.addsitedir(src)  # processes the .pth an install puts in site-packages
    sys.meta_path.insert(0, _PatchTimm)
    runpy.run_path(block, run_name="__main__")


class _PatchTimm:
    """Finds nothing; on the first import of ``timm``, hands back timm's own spec with a loader step that
    puts the stand-in behind ``timm.create_model`` once timm has loaded."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "timm":
            return None
        import importlib.util

        sys.meta_path.remove(cls)
        spec = importlib.util.find_spec("timm")
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch(timm) -> None:
    import torch

    create = timm.create_model

    def create_model(model_name, pretrained=False, **kwargs):
        cfg = timm.models.get_pretrained_cfg(model_name)
        local = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") or (cfg is not None and cfg.file)
        if not pretrained or local:
            return create(model_name, pretrained=pretrained, **kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return create(model_name, pretrained=False, **TINY, **kwargs)

    timm.create_model = create_model
