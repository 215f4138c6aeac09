"""Every Python block of the README runs as written: each in a fresh interpreter, in order, in one folder
(a later block may read what an earlier one saved), with the start-up hook an install puts in place and a
tiny seeded stand-in for each hub backbone it names (``tests/readme_standins.py``)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)
# what a user has that no block writes: a second trained adapter (here a copy of the first one's)
USER_FILES = {"runs/dogs": "runs/cub"}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs_as_written(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    }
    for number, block in enumerate(BLOCKS, 1):
        for name, source in USER_FILES.items():
            if name in block and not (tmp_path / name).exists():
                shutil.copytree(tmp_path / source, tmp_path / name)
        path = tmp_path / f"block{number}.py"
        path.write_text(block)
        code = f"import readme_standins; readme_standins.run({str(ROOT / 'src')!r}, {str(path)!r})"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"README block {number}:\n{block}\n{done.stderr[-3000:]}"
