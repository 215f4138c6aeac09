"""`selfprompt demo`: three methods on a VTAB-mini task, a table, a plot and a JSON, offline."""

from __future__ import annotations

import json

from selfprompt.apps.demo import DEMO_METHODS, demo, summary_sentence
from selfprompt.cli import main

import pytest
from conftest import small_vtab_mini


@pytest.mark.slow
def test_demo_trains_three_methods_and_writes_its_results(tmp_path):
    lines: list[str] = []
    with small_vtab_mini():  # the demo prepares its task itself: 128 train, 64 val, 128 test images
        results = demo(tmp_path / "demo", task="dsprites_location", epochs=1, log=lines.append)
    assert list(results["methods"]) == list(DEMO_METHODS)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for method, r in results["methods"].items():
        assert 0 <= r["test_acc"] <= 1 and len(r["val_curve"]) == 1, method
    params = {m: r["trainable_parameters"] for m, r in results["methods"].items()}
    assert params["linear"] < params["vpt-deep"] == params["spt-deep"]
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(lines).splitlines()
    assert [
        line.split()[0] for line in table if line.split()[:1] in (["linear"], ["vpt-deep"], ["spt-deep"])
    ] == [
        "linear",
        "vpt-deep",
        "spt-deep",
    ]
    assert f"Output folder: {(tmp_path / 'demo').resolve()}" in lines
    # the last line: one sentence from the numbers; NMI curves of the prompt runs, epoch 0 included
    assert lines[-1] == results["summary"] == summary_sentence(results) and lines[-1].startswith(
        "On dsprites_"
    )
    for method in ("vpt-deep", "spt-deep"):
        assert len(results["methods"][method]["nmi_curve"]) == 2, method
    assert "nmi_curve" not in results["methods"]["linear"]
    with pytest.raises(FileExistsError, match="already holds a demo"):
        demo(tmp_path / "demo", task="dsprites_location", epochs=1, log=lines.append)


def test_demo_cli_refuses_an_unknown_task(capsys):
    assert main(["demo", "--task", "cifar100"]) == 1
    assert "Unknown VTAB-mini task 'cifar100'" in capsys.readouterr().err


def test_the_sentence_says_within_noise_and_which_way():
    r = {"task": "t", "methods": {
        "linear": {"test_acc": 0.40},
        "vpt-deep": {"test_acc": 0.756, "nmi_curve": [0.05, 0.2]},
        "spt-deep": {"test_acc": 0.745, "nmi_curve": [0.30, 0.3]},
    }}  # fmt: skip
    assert summary_sentence(r) == (
        "On t, vpt-deep beats the linear probe by 35.6 test points; SPT's prototype initialisation ends 1.1 "
        "points behind VPT's random one (within the 2-point noise of one seed); its prompts start with more "
        "information about the patch tokens (NMI 0.30 vs 0.05 at epoch 0)."
    )
    r["methods"]["spt-deep"]["test_acc"] = 0.80
    assert "spt-deep beats the linear probe by 40.0" in summary_sentence(r)
    assert "4.4 points ahead of VPT's random one (beyond the 2-point noise" in summary_sentence(r)
