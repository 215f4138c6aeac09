"""``selfprompt serve``: a real server process on 127.0.0.1, a real HTTP client; bad input gets its 4xx and
the next good request is served; predictions equal ``selfprompt predict``."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from selfprompt.apps.predict import predict_run
from selfprompt.backbones import create_backbone
from selfprompt.engine.run import run
from selfprompt.methods.prompt import PromptedViT

import pytest
import torch
from engine_helpers import make_dataset, tiny_config
from PIL import Image

pytest.importorskip("litserve")
ZOO = "vit_mini_patch4_32.mae_fmnist"
TOKEN = "s3cret-token"
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(size=(32, 32), color=(200, 30, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _parse(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return {"text": body.decode(errors="replace")}


class Client:
    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def call(self, path, body=None, content_type="application/json", token=True):
        headers = {"Content-Type": content_type} if body is not None else {}
        if token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _parse(error.read())

    def predict(self, image: bytes, tasks, topk=1, **fields):
        body = {"image": base64.b64encode(image).decode(), "tasks": tasks, "topk": topk, **fields}
        return self.call("/predict", json.dumps(body).encode())

    def predict_form(self, image: bytes, tasks: str, topk=1):
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="tasks"\r\n\r\n{tasks}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="topk"\r\n\r\n{topk}\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        return self.call("/predict", b"".join(parts), f"multipart/form-data; boundary={boundary}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data")
    cfg = tiny_config(data, root / "run", method="vpt-deep", **{"optim.epochs": 1})
    cfg.model.backbone, cfg.model.pretrained, cfg.model.backbone_kwargs = ZOO, True, {}
    cfg.seeds = [0]
    run(cfg, log=lambda _: None)
    torch.manual_seed(0)
    PromptedViT(create_backbone(ZOO), 5, num_prompts=7, pool="avg").save_pretrained(root / "shallow")
    port = _free_port()
    command = [
        sys.executable, "-m", "selfprompt", "serve", "--adapter", f"run={root / 'run'}",
        f"shallow={root / 'shallow'}", "--backbone", ZOO, "--port", str(port), "--max_tasks", "2",
        "--max_pixels", "10000", "--max_bytes", "200000", "--token", TOKEN,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    log = open(root / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(port)
    try:
        for _ in range(120):
            if server.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            try:
                if client.call("/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start in 60 s")
        yield client, root, data
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session this test started: the server and its workers
        server.wait(timeout=30)
        log.close()


def _good(client):
    status, body = client.predict(_png(), ["run", "shallow"], topk=2)
    assert status == 200, body
    assert set(body["predictions"]) == {"run", "shallow"}


def test_predictions_equal_selfprompt_predict(served):
    client, root, data = served
    files = sorted((data / "test").rglob("*.png"))[:4]
    offline = predict_run(root / "run", [str(f) for f in files], None, "final", "cpu", topk=2)
    for path, row in zip(files, offline, strict=True):
        for call in (client.predict, client.predict_form):
            status, body = call(path.read_bytes(), "run" if call == client.predict_form else ["run"], topk=2)
            assert status == 200, body
            got = body["predictions"]["run"]
            assert [g["class"] for g in got] == [row["class_1"], row["class_2"]]
            assert abs(got[0]["probability"] - row["probability_1"]) <= 2e-6


def test_tasks_and_health(served):
    client, _, _ = served
    status, body = client.call("/tasks")
    assert status == 200 and set(body["tasks"]) == {"run", "shallow"}
    assert body["tasks"]["run"]["classes"] == ["class0", "class1", "class2"]
    assert client.call("/health")[0] == 200


def _truncated_png() -> bytes:
    return _png()[:60]


@pytest.mark.parametrize(
    "case, status",
    [
        ("unknown task", 404),
        ("corrupt image", 400),
        ("empty image", 400),
        ("not an image", 400),
        ("too many pixels", 413),
        ("body too large", 413),
        ("malformed json", 400),
        ("json not an object", 400),
        ("not base64", 400),
        ("too many tasks", 400),
        ("no task", 400),
        ("bad topk", 400),
        ("wrong content type", 415),
        ("malformed form", 400),
        ("no token", 401),
        ("wrong token", 401),
    ],
)
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(served, case, status):
    client, _, _ = served
    calls = {
        "unknown task": lambda: client.predict(_png(), ["nope"]),
        "corrupt image": lambda: client.predict(_truncated_png(), ["run"]),
        "empty image": lambda: client.predict(b"", ["run"]),
        "not an image": lambda: client.predict(b"hello, not an image", ["run"]),
        "too many pixels": lambda: client.predict(_png((200, 200)), ["run"]),
        "body too large": lambda: client.predict(os.urandom(300_000), ["run"]),
        "malformed json": lambda: client.call("/predict", b'{"image": '),
        "json not an object": lambda: client.call("/predict", b"[1, 2]"),
        "not base64": lambda: client.call(
            "/predict", json.dumps({"image": "%%%", "tasks": ["run"]}).encode()
        ),
        "too many tasks": lambda: client.predict(_png(), ["run", "shallow", "run2"]),
        "no task": lambda: client.predict(_png(), []),
        "bad topk": lambda: client.predict(_png(), ["run"], topk="many"),
        "wrong content type": lambda: client.call("/predict", b"x", "text/plain"),
        "malformed form": lambda: client.call("/predict", b"garbage", "multipart/form-data; boundary=zz"),
        "no token": lambda: client.call("/predict", b"{}", token=False),
        "wrong token": lambda: Client(int(client.base.rsplit(":", 1)[1]), "wrong").predict(_png(), ["run"]),
    }
    got, body = calls[case]()
    assert got == status, body
    assert isinstance(body.get("detail"), str) and body["detail"]
    _good(client)


def test_tasks_listing_needs_the_token(served):
    client, _, _ = served
    assert client.call("/tasks", token=False)[0] == 401
