"""Bad configs, bad run folders, bad adapters and interrupted writes through the real CLI: each gives one
message that says what is wrong, which file and the fix, never a traceback; a bug still shows one."""

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from selfprompt.atomic import DiskFullError, atomic_write
from selfprompt.cli import main, user_message
from selfprompt.engine.distributed import resolve_device
from selfprompt.engine.run import run
from selfprompt.engine.rundir import RunDir

import pytest
import torch
from engine_helpers import cli_args, make_dataset, tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SHORT = ["--stage", "final", "--optim.epochs", "1", "--optim.warmup_epochs", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``selfprompt ARGV`` in this process: (exit status, stderr); stderr never holds a traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # a usage error
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def train(capsys, data, out, *extra: str) -> tuple[int, str]:
    return cli(capsys, "train", *cli_args(data, out), *SHORT, *extra)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *cli_args(data, out), *SHORT]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# 4, 7, 10: config values are checked before the run folder is written -------------------------------------

BAD_VALUES = [
    (["--prompt.num_prompts", "0"], "prompt.num_prompts must be an integer in 1..1024"),
    (["--prompt.num_prompts", "100000"], "prompt.num_prompts must be an integer in 1..1024"),
    (["--data.eval_batch_size", "0"], "data.eval_batch_size must be an integer >= 1, got 0"),
    (["--data.batch_size", "0"], "data.batch_size must be an integer >= 1, got 0"),
    (["--optim.lr", "0"], "optim.lr must be a finite number > 0"),
    (["--optim.epochs", "0"], "optim.epochs must be an integer >= 1, got 0"),
    (["--optim.epochs", "-1"], "optim.epochs must be an integer >= 1, got -1"),
    (["--optim.warmup_epochs", "5"], "optim.warmup_epochs (5) must not exceed optim.epochs (1)"),
    (["--seeds", "[]"], "seeds must be a non-empty list of integers"),
    (["--seeds", "[1, 1]"], "seeds lists a seed twice"),
    (["--prompt.dropout", "1.5"], "prompt.dropout must be in [0, 1)"),
    (["--data.batch_size", "1000"], "fewer than one global batch (1000); lower --data.batch_size to at most"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_a_bad_value_is_refused_before_the_folder_is_written(extra, message, data, tmp_path, capsys):
    code, err = train(capsys, data, tmp_path / "run", *extra)
    assert code == 1 and message in err, err
    assert "--" in err, "the message says how to set it"
    assert not (tmp_path / "run" / "config.yaml").exists()


NON_FINITE = [
    (["--optim.lr", "inf"], "optim.lr must be a finite number > 0 (e.g. 1e-3), got inf"),
    (["--optim.lr=nan"], "optim.lr must be a finite number > 0 (e.g. 1e-3), got nan"),
    (["--optim.lr", "-inf"], "optim.lr must be a finite number > 0 (e.g. 1e-3), got -inf"),
    (["--optim.weight_decay", "Infinity"], "optim.weight_decay must be a finite number >= 0, got inf"),
    (["--optim.grad_clip", "NaN"], "optim.grad_clip must be a finite number > 0 or null, got nan"),
    (["--optim.betas", "[0.9, inf]"], "optim.betas must be two numbers in [0, 1)"),
    (["--lora.alpha", "nan"], "lora.alpha must be a finite number, got nan"),  # no range of its own
]


@pytest.mark.parametrize(("extra", "message"), NON_FINITE, ids=[" ".join(e) for e, _ in NON_FINITE])
def test_a_non_finite_number_is_one_line_naming_its_range(extra, message, data, tmp_path, capsys):
    code, err = train(capsys, data, tmp_path / "run", *extra)
    assert code == 1 and message in err and "usage:" not in err and len(err.splitlines()) == 2, err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: .inf\n  weight_decay: -inf\n")  # YAML's spelling and Python's
    code, err = cli(capsys, "train", recipe, "--output_dir", tmp_path / "run")
    assert code == 1 and "optim.lr must be a finite number > 0 (e.g. 1e-3), got inf" in err, err
    assert "optim.weight_decay must be a finite number >= 0, got -inf" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_num_prompts_default_is_only_for_null(data, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"prompt\.num_prompts must be an integer in 1\.\.1024 or null \(the default\), got 0",
    ):
        run(tiny_config(data, tmp_path, **{"prompt.num_prompts": 0}))
    for lr in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"optim\.lr must be a finite number > 0"):
            run(tiny_config(data, tmp_path, **{"optim.lr": lr}))
    assert not (tmp_path / "config.yaml").exists()


def test_a_run_that_never_finished_an_epoch_does_not_block_a_retry(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("optim:\n  lr: 0.0\n")  # what an old failed start left
    code, err = train(capsys, data, out)
    assert code == 0, err
    assert (out / "seed0" / "final" / "result.json").is_file()
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "config.yaml").write_text("optim:\n  lr: 0.0\n")
    code, err = train(capsys, data, tmp_path / "again", "--resume", "true")  # a resume with the fix
    assert code == 0, err


def test_the_advice_after_a_non_finite_loss_works_in_the_same_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*cli_args(data, out), "--stage", "tune"]
    code, err = cli(capsys, "train", *args, "--optim.lr", "1e6")  # finite after epoch 1, nan in epoch 2
    assert code == 1 and re.search(r"the training loss became (nan|-?inf) in epoch [23]", err), err
    assert "--optim.lr 100000" in err and "--optim.grad_clip 1.0" in err and "--resume false" in err
    assert (out / "seed0" / "tune" / "state.pt").is_file()  # a run with progress, which used to block both
    code, err = cli(capsys, "train", *args, "--optim.lr", "0.01", "--resume", "true")
    assert code == 1 and "the config changed in optim.lr" in err and "--resume false" in err, err
    code, err = cli(capsys, "train", *args, "--optim.lr", "0.01")  # the advice, followed
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "seed0" / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "lr: 0.01\n" in (out / "config.yaml").read_text()
    assert not (out / "diverged.json").exists() and (out / "summary.json").is_file()
    code, err = cli(capsys, "train", *args, "--optim.lr", "0.01")
    assert code == 1 and "already holds a run" in err  # a finished run is never replaced


# 8, 9: the run folder's lock, temporary files, a moved folder ---------------------------------------------


def test_a_folder_in_use_is_refused_and_a_dead_holder_is_taken_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    with RunDir(out).locked():
        code, err = train(capsys, data, out)
        assert code == 1 and f"{out} is in use by this process (PID {os.getpid()})" in err
        code, err = train(capsys, data, out, "--resume", "true")
        assert code == 1 and "in use" in err
    script = (
        "import time\nfrom pathlib import Path\nfrom selfprompt.engine.rundir import RunDir\n"
        f"with RunDir(Path({str(out)!r})).locked():\n    print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    code, err = train(capsys, data, out)
    assert code == 1 and f"PID {holder.pid}" in err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, err = train(capsys, data, out)
    assert code == 0, err


def test_resume_removes_leftover_temporary_files(run_copy, data, capsys):
    left = [run_copy / ".config.yaml.4242.tmp", run_copy / "seed0" / "final" / ".state.pt.4243.tmp"]
    for path in left:
        path.write_text("half")
    keep = run_copy / "notes.tmp"
    keep.write_text("mine")
    code, err = train(capsys, data, run_copy, "--resume", "true")
    assert code == 0, err
    assert not any(p.exists() for p in left) and keep.exists()


def test_a_moved_run_folder_resumes_where_it_is(trained, data, tmp_path, capsys):
    moved = Path(shutil.copytree(trained, tmp_path / "elsewhere"))
    code, err = train(capsys, data, moved, "--resume", "true")
    assert code == 0, err
    assert RunDir(moved).read_config()["output_dir"] == str(moved)


# 10: damaged run folders and adapters ---------------------------------------------------------------------


def _adapter(run: Path) -> Path:
    return run / "seed0" / "final" / "adapter"


def _edit_config(run: Path, **changes) -> None:
    path = _adapter(run) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _predict(capsys, run: Path, data: Path, *extra: str) -> tuple[int, str]:
    return cli(capsys, "predict", run, data / "test" / "class0", "--device", "cpu", *extra)


DAMAGE = {
    "truncated adapter.safetensors": (
        lambda run: (_adapter(run) / "adapter.safetensors").write_bytes(
            (_adapter(run) / "adapter.safetensors").read_bytes()[:100]
        ),
        "adapter.safetensors cannot be read",
    ),
    "adapter_config.json without class": (
        lambda run: _edit_json(_adapter(run) / "adapter_config.json", lambda c: c.pop("class")),
        "adapter_config.json lacks 'class'",
    ),
    "adapter_config.json with an unknown class": (
        lambda run: _edit_json(_adapter(run) / "adapter_config.json", lambda c: c.update({"class": "Nope"})),
        "holds a 'Nope' adapter, which no registered method builds",
    ),
    "adapter_config.json without backbone": (
        lambda run: _edit_json(_adapter(run) / "adapter_config.json", lambda c: c.pop("backbone")),
        "adapter_config.json lacks 'backbone'",
    ),
    "adapter_config.json as an array": (
        lambda run: (_adapter(run) / "adapter_config.json").write_text("[1, 2]"),
        "adapter_config.json must hold a JSON object, got a list",
    ),
    "adapter_config.json cut short": (
        lambda run: (_adapter(run) / "adapter_config.json").write_text('{"format_version": 1, "cla'),
        "adapter_config.json is not valid JSON",
    ),
    "id2label shorter than the head": (
        lambda run: _edit_config(run, id2label={"0": "a"}),
        "the labels name 1 classes, the head has 3",
    ),
    "config.yaml as a list": (
        lambda run: (run / "config.yaml").write_text("- 1\n- 2\n"),
        "config.yaml must hold a mapping of config sections, got list",
    ),
    "config.yaml with model as a list": (
        lambda run: (run / "config.yaml").write_text("model: [1, 2]\n"),
        "config.yaml does not hold a config this selfprompt reads",
    ),
}


def _edit_json(path: Path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_or_adapter_is_named(damage, run_copy, data, capsys):
    spoil, message = DAMAGE[damage]
    spoil(run_copy)
    code, err = _predict(capsys, run_copy, data)
    assert code == 1 and message in err, err
    if "classes.json" in damage:
        code, err = cli(capsys, "eval", run_copy, "--device", "cpu")
        assert code == 1 and message in err, err


def _started_run(data, tmp_path, capsys) -> Path:
    """A run whose final stage has a checkpoint and no result yet (as if killed after epoch 1)."""
    out = tmp_path / "run"
    code, err = train(capsys, data, out)
    assert code == 0, err
    (out / "seed0" / "final" / "result.json").unlink()
    return out


@pytest.mark.parametrize("kind", ["truncated", "pickled object", "foreign dict"])
def test_a_damaged_state_file_is_named_with_the_fix(kind, data, tmp_path, capsys):
    out = _started_run(data, tmp_path, capsys)
    state = out / "seed0" / "final" / "state.pt"
    if kind == "truncated":
        state.write_bytes(state.read_bytes()[:500])
    elif kind == "pickled object":
        torch.save({"epoch": 1, "thing": Path("x")}, state)
    else:
        torch.save({"epoch": 1}, state)
    code, err = train(capsys, data, out, "--resume", "true")
    assert code == 1 and str(state) in err and f"Delete {state} to train this stage again" in err, err
    assert "weights_only" not in err
    assert {"truncated": "damaged or cut short", "pickled object": "not a selfprompt training state",
            "foreign dict": "not a selfprompt training state"}[kind] in err  # fmt: skip


def test_a_damaged_result_file_is_named(data, tmp_path, capsys):
    out = _started_run(data, tmp_path, capsys)
    (out / "seed0" / "final" / "result.json").write_text('{"stage": ')
    code, err = train(capsys, data, out, "--resume", "true")
    assert code == 1 and "result.json is not valid JSON" in err, err


# 10: recipes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n- 2\n", "must hold a mapping of config sections (model:, data:, optim:, ...), got a list"),
        ("42\n", "must hold a mapping of config sections (model:, data:, optim:, ...), got a int"),
        ("model: [1, 2]\n", "model must be a mapping of its fields"),
        ("optim:\n  lr: 1\n  lr: 2\n", "key 'lr' is given twice"),
        ("optim: {lr: [\n", "fix the YAML there"),
    ],
)
def test_a_bad_recipe_is_a_usage_message(text, message, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, err = cli(capsys, "train", recipe, "--output_dir", tmp_path / "run")
    assert code == 2 and message in err and str(recipe) in err, err


def test_a_list_file_in_latin1_is_a_message(data, tmp_path, capsys):
    bad = Path(shutil.copytree(data, tmp_path / "data"))
    lines = (bad / "val.txt").read_text().splitlines()
    lines[0] = lines[0].replace("class", "cl\u00e4ss")
    (bad / "val.txt").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    code, err = train(capsys, bad, tmp_path / "run", "--stage", "tune")
    assert code == 1 and "val.txt:1:" in err and "UTF-8" in err, err


# 10: interrupted writes, a full disk, non-finite losses, and where the line to a traceback runs -----------


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("previous")

    def full(path: Path) -> None:
        path.write_text("part")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(DiskFullError, match=f"The disk is full: cannot write {target}"):
        atomic_write(target, full)
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    message = user_message(OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"))
    assert "The disk is full: cannot write /runs/x/metrics.jsonl" in message and "--resume true" in message


TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file"


@pytest.mark.parametrize("raised", ["ENOSPC", "torch"])
def test_a_full_disk_during_a_checkpoint_is_one_sentence(raised, data, tmp_path, monkeypatch, capsys):
    def full(obj, path, *args, **kwargs):
        if raised == "torch":  # what torch raises when its writer hits a full disk
            raise RuntimeError(TORCH_WRITE_FAILED)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    if raised == "torch":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    code, err = train(capsys, data, tmp_path / "run")
    state = tmp_path / "run" / "seed0" / "final" / "state.pt"
    assert code == 1 and err == (
        f"selfprompt train: error: The disk is full: cannot write {state}; free space on that disk, then run "
        f"the command again (a training run continues where it stopped with --resume true).\n"
    ), err


def test_which_errors_are_messages_and_which_are_bugs():
    assert "optim.lr" in user_message(FloatingPointError("the training loss became nan; lower optim.lr"))
    assert user_message(KeyError("prompts")) is None
    assert user_message(IndexError("list index out of range")) is None
    try:
        torch.zeros(2) @ torch.zeros(3)  # a shape bug inside torch
    except RuntimeError as error:
        assert user_message(error) is None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError) as caught:
            resolve_device("cuda")  # raised by selfprompt on purpose
        assert user_message(caught.value) == str(caught.value)


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    from selfprompt.cli import COMMANDS

    def broken(args):
        return {}["missing"]

    monkeypatch.setitem(COMMANDS, "eval", COMMANDS["eval"].__class__(
        "eval", "", COMMANDS["eval"].parser, broken))  # fmt: skip
    with pytest.raises(KeyError):
        main(["eval", "somewhere"])


# 11: predict keeps going past a bad file ------------------------------------------------------------------


def _oversized_png(path: Path) -> None:
    """A PNG whose header claims 60000 x 60000 pixels (a decompression bomb to PIL)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_predict_reports_bad_files_and_predicts_the_rest(trained, data, tmp_path, capsys):
    images = Path(shutil.copytree(data / "test" / "class0", tmp_path / "images"))
    (images / "empty.png").write_bytes(b"")
    _oversized_png(images / "huge.png")
    output = tmp_path / "p.csv"
    code, err = cli(capsys, "predict", trained, images, "--device", "cpu", "--output", output)
    assert code == 1 and "2 of 10 images could not be read" in err, err
    assert "empty.png: the file is empty" in err and "huge.png" in err
    rows = output.read_text().splitlines()
    assert rows[0] == "path,class,probability,error" and len(rows) == 11
    assert sum(1 for r in rows[1:] if r.endswith(",")) == 8, rows  # predicted, no error


def test_predict_searches_a_folder_named_like_an_image(trained, data, tmp_path, capsys):
    folder = Path(shutil.copytree(data / "test" / "class0", tmp_path / "images" / "x.png"))
    output = tmp_path / "p.csv"
    for target in (folder, folder.parent):
        code, err = cli(capsys, "predict", trained, target, "--device", "cpu", "--output", output)
        assert code == 0 and err == "", err
        rows = output.read_text().splitlines()
        assert rows[0] == "path,class,probability" and len(rows) == 1 + len(list(folder.iterdir()))
    (tmp_path / "empty.png").mkdir()
    code, err = cli(capsys, "predict", trained, tmp_path / "empty.png", "--device", "cpu")
    assert code == 1 and "No images found" in err and "split" not in err, err


def test_predict_refuses_topk_below_one(trained, data, capsys):
    code, err = _predict(capsys, trained, data, "--topk", "0")
    assert code == 1 and "--topk must be an integer >= 1" in err, err


# a real process -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_process_prints_one_message_and_no_traceback(data, tmp_path):
    for extra in (["--optim.lr", "0"], ["--optim.epochs", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "selfprompt", "train", *cli_args(data, tmp_path / "run"), *extra],
            env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "selfprompt train: error: Invalid config" in done.stderr
