"""Start-up hook, run by ``selfprompt-torchvision.pth`` (installed beside the package) in every interpreter:
it makes ``import torchvision`` (and so ``import timm``) work beside a CPU-only torch whichever package is
imported first, by running :mod:`selfprompt._torchvision_compat` just before torchvision is first found.

Start-up pays one small import: this module uses only ``sys``, and nothing runs until ``torchvision`` is
imported. Neither ``selfprompt`` nor torch is imported here: the guard module is loaded from its file alone.
"""

import sys


class _BeforeTorchvision:
    """A ``sys.meta_path`` finder that finds nothing: on the first look-up of ``torchvision`` it removes
    itself, runs the guard, and lets the ordinary finders import torchvision."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torchvision":
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        _run_guard()
        return None


def _run_guard() -> None:
    import importlib.util
    import os

    name = "selfprompt._torchvision_compat"
    package = importlib.util.find_spec("selfprompt")
    if name in sys.modules or package is None or not package.submodule_search_locations:
        return  # selfprompt ran it already, or is not installed
    path = os.path.join(next(iter(package.submodule_search_locations)), "_torchvision_compat.py")
    if not os.path.isfile(path):
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # selfprompt's own import of it finds this one: the guard runs once
    spec.loader.exec_module(module)
    module.ensure_torchvision_importable()


if "torchvision" not in sys.modules and _BeforeTorchvision not in sys.meta_path:
    sys.meta_path.insert(0, _BeforeTorchvision)
