"""`selfprompt demo`: three methods on a VTAB-mini task, a table, a plot and a JSON, offline."""

from __future__ import annotations

import json

from selfprompt.apps.demo import DEMO_METHODS, demo
from selfprompt.cli import main

import pytest


def test_demo_trains_three_methods_and_writes_its_results(tmp_path):
    lines: list[str] = []
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
    assert lines[-1] == f"Output folder: {(tmp_path / 'demo').resolve()}"
    with pytest.raises(FileExistsError, match="already holds a demo"):
        demo(tmp_path / "demo", task="dsprites_location", epochs=1, log=lines.append)


def test_demo_cli_refuses_an_unknown_task(capsys):
    assert main(["demo", "--task", "cifar100"]) == 1
    assert "Unknown VTAB-mini task 'cifar100'" in capsys.readouterr().err
