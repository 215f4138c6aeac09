"""Adapters and prompts files holding NaN or Inf: every loader refuses them, naming the file, the tensor and
the fix (one line through the CLI, exit 1); saving them is refused and writes nothing."""

import shutil
from pathlib import Path

from selfprompt import PromptedViT, load_pretrained
from selfprompt.cli import main
from selfprompt.engine.run import run
from selfprompt.methods.prompt import save_prompts_file
from selfprompt.serving.loading import load_multitask

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import cli_args, make_dataset, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VALUES = {"nan": (float("nan"), "NaN"), "inf": (float("-inf"), "Inf")}
ONE_EPOCH = {"stage": "final", "optim.epochs": 1, "optim.warmup_epochs": 0}


def damage(file: Path, value: float, key: str = "prompts") -> Path:
    """``file`` with one value of its tensor ``key`` replaced by ``value``, its metadata kept."""
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[key].view(-1)[1] = value
    save_file(tensors, file, metadata=metadata)
    return file


def check_refusal(message: str, file: Path, key: str, kind: str) -> None:
    assert str(file) in message and f"tensor '{key}' holds 1 {kind}" in message, message
    assert "diverged" in message and "optim.lr" in message, message


def cli_refuses(capsys, argv: list, file: Path, key: str, kind: str) -> None:
    """``selfprompt ARGV`` exits 1 with the refusal as one line ``selfprompt CMD: error: ...``."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"selfprompt {argv[0]}: error: ")]
    assert len(lines) == 1, err
    check_refusal(lines[0], file, key, kind)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def vpt_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vpt") / "run"
    run(tiny_config(data, out, method="vpt-deep", **ONE_EPOCH), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def e2vpt_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2vpt") / "run"
    run(tiny_config(data, out, method="e2vpt", **ONE_EPOCH), log=lambda _: None)
    return out


@pytest.fixture(params=list(VALUES))
def value(request) -> tuple[float, str]:
    return VALUES[request.param]


def damaged_run(run_dir: Path, tmp_path: Path, value: float) -> tuple[Path, Path]:
    """A copy of ``run_dir`` whose final adapter holds ``value`` in its prompts: (run, weights file)."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    return copy, damage(copy / "seed0" / "final" / "adapter" / "adapter.safetensors", value)


@pytest.fixture
def damaged(vpt_run, tmp_path, value) -> tuple[Path, Path, str]:
    """(run folder, its damaged weights file, the kind of value) from the vpt-deep run."""
    run_dir, weights = damaged_run(vpt_run, tmp_path, value[0])
    return run_dir, weights, value[1]


@pytest.fixture
def damaged_adapter(tmp_path, value) -> tuple[Path, str]:
    """(adapter folder of a PromptedViT on ``tiny_vit()`` whose head weight holds the value, kind)."""
    folder = PromptedViT(tiny_vit(), 3, num_prompts=2).save_pretrained(tmp_path / "adapter")
    damage(folder / "adapter.safetensors", value[0], "head.weight")
    return folder, value[1]


# loading: the library -------------------------------------------------------------------------------------


def test_from_pretrained_refuses_a_nonfinite_adapter(damaged_adapter):
    folder, kind = damaged_adapter
    with pytest.raises(ValueError) as error:
        PromptedViT.from_pretrained(folder, tiny_vit())
    check_refusal(str(error.value), folder / "adapter.safetensors", "head.weight", kind)


def test_load_pretrained_refuses_a_nonfinite_adapter(damaged_adapter):
    folder, kind = damaged_adapter
    with pytest.raises(ValueError) as error:
        load_pretrained(folder, tiny_vit())
    check_refusal(str(error.value), folder / "adapter.safetensors", "head.weight", kind)


def test_load_multitask_refuses_a_nonfinite_adapter(damaged, vpt_run):
    """What serve and export load: a damaged task is refused beside a healthy one."""
    run_dir, weights, kind = damaged
    with pytest.raises(ValueError) as error:
        load_multitask({"healthy": vpt_run, "damaged": run_dir})
    check_refusal(str(error.value), weights, "prompts", kind)


def test_serve_refuses_a_nonfinite_adapter_before_starting(damaged, capsys, monkeypatch):
    pytest.importorskip("litserve")
    pytest.importorskip("python_multipart")
    from selfprompt.serving import server

    def started(*args, **kwargs):
        raise AssertionError("the server was built for a damaged adapter")

    monkeypatch.setattr(server.ls, "LitServer", started)
    run_dir, weights, kind = damaged
    cli_refuses(capsys, ["serve", "--adapter", f"task={run_dir}"], weights, "prompts", kind)


# loading: the commands ------------------------------------------------------------------------------------


def test_predict_refuses_a_nonfinite_adapter(damaged, data, capsys):
    run_dir, weights, kind = damaged
    argv = ["predict", run_dir, data / "test" / "class0", "--device", "cpu"]
    cli_refuses(capsys, argv, weights, "prompts", kind)


def test_eval_refuses_a_nonfinite_adapter(damaged, capsys):
    run_dir, weights, kind = damaged
    cli_refuses(capsys, ["eval", run_dir, "--device", "cpu"], weights, "prompts", kind)


def test_export_refuses_a_nonfinite_adapter(damaged, tmp_path, capsys):
    run_dir, weights, kind = damaged
    output = tmp_path / "model.onnx"
    cli_refuses(capsys, ["export", run_dir, "--output", output], weights, "prompts", kind)
    assert not output.exists()


def test_condense_refuses_a_nonfinite_adapter(damaged, tmp_path, capsys):
    run_dir, weights, kind = damaged
    output = tmp_path / "condensed"
    argv = ["condense", run_dir, "--keep", "0.5", "--output", output, "--device", "cpu"]
    cli_refuses(capsys, argv, weights, "prompts", kind)
    assert not output.exists()


def test_prune_refuses_a_nonfinite_adapter(e2vpt_run, tmp_path, value, capsys):
    run_dir, weights = damaged_run(e2vpt_run, tmp_path, value[0])
    output = tmp_path / "scores.json"
    argv = ["prune", run_dir, "--output", output, "--device", "cpu"]
    cli_refuses(capsys, argv, weights, "prompts", value[1])
    assert not output.exists()


@pytest.mark.parametrize("source", ["run", "prompts file"])
def test_transfer_prompts_refuses_a_nonfinite_source(source, damaged, value, tmp_path, capsys):
    run_dir, weights, kind = damaged
    if source == "prompts file":
        weights = save_prompts_file(tmp_path / "prompts.safetensors", torch.zeros(2, 4, 32), {})
        run_dir = damage(weights, value[0])
    output = tmp_path / "transferred.safetensors"
    cli_refuses(capsys, ["transfer-prompts", run_dir, "--output", output], weights, "prompts", kind)
    assert not output.exists()


def test_prompt_file_refuses_nonfinite_prompts(data, tmp_path, value, capsys):
    """``--prompt.file``: a run does not start from damaged prompts (cli_args: 2 layers of 4 prompts)."""
    prompts = save_prompts_file(tmp_path / "prompts.safetensors", torch.zeros(2, 4, 32), {})
    damage(prompts, value[0])
    out = tmp_path / "run"
    argv = ["train", *cli_args(data, out), "--stage", "final", "--optim.epochs", "1"]
    argv += ["--prompt.file", prompts]
    cli_refuses(capsys, argv, prompts, "prompts", value[1])
    assert not (out / "seed0" / "final" / "adapter").exists()


# saving ---------------------------------------------------------------------------------------------------


def test_saving_a_nonfinite_adapter_is_refused_and_writes_nothing(tmp_path, value):
    model = PromptedViT(tiny_vit(), 3, num_prompts=2)
    with torch.no_grad():
        model.prompts[0, 1, 2] = value[0]
    with pytest.raises(FloatingPointError) as error:
        model.save_pretrained(tmp_path / "new")
    check_refusal(str(error.value), tmp_path / "new" / "adapter.safetensors", "prompts", value[1])
    assert "Nothing was written" in str(error.value) and not (tmp_path / "new").exists()
    # over an earlier adapter: that one stays whole, and no temporary file is left beside it
    with torch.no_grad():
        model.prompts.zero_()
    folder = model.save_pretrained(tmp_path / "earlier")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        model.head.bias[0] = value[0]
    with pytest.raises(FloatingPointError, match=r"tensor 'head\.bias'"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_saving_nonfinite_prompts_file_is_refused_and_writes_nothing(tmp_path, value):
    prompts = torch.zeros(2, 4, 32)
    prompts[1, 2, 3] = value[0]
    with pytest.raises(FloatingPointError) as error:
        save_prompts_file(tmp_path / "out" / "prompts.safetensors", prompts, {})
    check_refusal(str(error.value), tmp_path / "out" / "prompts.safetensors", "prompts", value[1])
    assert not (tmp_path / "out").exists()


def test_a_run_that_diverges_on_its_last_step_stops_at_the_save(data, tmp_path, capsys, monkeypatch):
    """One step (a batch of all 48 training images) that leaves NaN in the prompts: its loss was finite, so
    the loss check passes; the run stops with the save's refusal, not with an adapter nothing can load."""
    step = torch.optim.AdamW.step

    def diverging(self, *args, **kwargs):
        step(self, *args, **kwargs)
        for group in self.param_groups:
            for param in group["params"]:
                param.data.view(-1)[0] = float("nan")

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)
    out = tmp_path / "run"
    argv = ["train", *cli_args(data, out), "--stage", "tune", "--optim.epochs", "1"]
    argv += ["--optim.warmup_epochs", "0", "--data.batch_size", "48"]
    weights = out / "seed0" / "tune" / "adapter" / "adapter.safetensors"
    cli_refuses(capsys, argv, weights, "prompts", "NaN")
    assert not weights.parent.exists()
