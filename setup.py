"""Everything is in pyproject.toml but one step it cannot say: install ``selfprompt-torchvision.pth`` at the
top of site-packages, beside the package, for regular and editable installs alike. The start-up hook it
runs (``src/_selfprompt_torchvision_hook.py``) makes ``import timm`` work before ``import selfprompt`` on a
CPU-only torch (``selfprompt/_torchvision_compat.py`` says why)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = Path("src", "selfprompt-torchvision.pth")


class BuildPyWithHook(build_py):
    """build_py, plus the .pth at the top of the wheel: ``build_lib`` for a regular wheel; for an editable
    one (PEP 660), the folder setuptools packs as that wheel's top, which its ``install`` command names."""

    def run(self) -> None:
        super().run()
        top = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(HOOK), str(Path(top, HOOK.name)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, HOOK.name))]


setup(cmdclass={"build_py": BuildPyWithHook})
