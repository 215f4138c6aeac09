"""A run killed mid-stage and resumed ends exactly where an uninterrupted one does, for every random source
(prompt dropout, drop-path, crop-flip augmentation) with loader worker processes."""

import os
import signal
import subprocess
import sys
import time

from selfprompt.engine.loop import SeededSamples, sample_seed

import pytest
import torch
from engine_helpers import adapter, cli_args, make_dataset, metrics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORKERS = ["--data.num_workers", "2", "--stage", "final", "--optim.epochs", "4"]
SOURCES = {
    "prompt-dropout": ["--model.method", "vpt-deep", "--prompt.dropout", "0.1"],
    "drop-path": ["--model.method", "full", "--model.drop_path", "0.1", "--optim.lr", "0.001"],
    "crop-flip": ["--data.augment", "crop-flip"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _train(data, out, extra: list[str]) -> list[str]:
    args = cli_args(data, out)
    if "full" in extra:  # no prompts
        at = args.index("--prompt.num_prompts")
        del args[at : at + 2]
    return [sys.executable, "-m", "selfprompt", "train", *args, *WORKERS, *extra]


def _kill_after(command: list[str], rows_file, rows: int) -> None:
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if rows_file.is_file() and len(rows_file.read_text().splitlines()) >= rows:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_a_run_killed_in_its_final_stage_resumes_exactly(source, data, tmp_path):
    extra = SOURCES[source]
    subprocess.run(_train(data, tmp_path / "whole", extra), env=ENV, check=True, capture_output=True)
    killed = _train(data, tmp_path / "killed", extra)
    _kill_after(killed, tmp_path / "killed" / "seed0" / "final" / "metrics.jsonl", 2)
    assert not (tmp_path / "killed" / "seed0" / "final" / "result.json").exists()
    done = subprocess.run([*killed, "--resume", "true"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch" in done.stdout
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    for key, value in adapter(tmp_path / "whole").items():
        assert torch.equal(adapter(tmp_path / "killed")[key], value), key


def test_augmentation_depends_on_seed_epoch_and_index_only():
    draws = SeededSamples(type("Noise", (), {"__getitem__": lambda self, i: torch.rand(3)})())
    torch.manual_seed(1)
    first = draws[(5, sample_seed(0, 2, 5))]
    state = torch.get_rng_state()
    torch.manual_seed(99)  # another global state gives the same sample
    assert torch.equal(draws[(5, sample_seed(0, 2, 5))], first)
    torch.manual_seed(1)
    draws[(5, sample_seed(0, 2, 5))]
    assert torch.equal(torch.get_rng_state(), state), "the global stream is left as it was"
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (1, 2) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
