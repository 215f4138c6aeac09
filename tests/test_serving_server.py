"""``selfprompt serve``: a real server process on 127.0.0.1, a real HTTP client; bad input gets its 4xx and
the next good request is served, also when it is batched with good ones; predictions equal ``selfprompt
predict``; SIGTERM or SIGINT to the server's process stops all of its processes; a bad adapter is refused in
one line before any worker starts."""

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfprompt.apps.predict import predict_run
from selfprompt.backbones import create_backbone
from selfprompt.engine.run import run
from selfprompt.methods.prompt import PromptedViT
from selfprompt.serving.server import MAX_JSON_DEPTH, Invalid, Job, ServeSettings, json_depth

import pytest
import torch
from engine_helpers import make_dataset, tiny_config
from PIL import Image

pytest.importorskip("litserve")
ZOO = "vit_mini_patch4_32.mae_fmnist"
TOKEN = "s3cret-token"
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
SERVE = [sys.executable, "-m", "selfprompt", "serve"]


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

    def predict_literal(self, image: bytes, tasks, topk: str):
        """``topk`` written into the JSON text as given (1e400, Infinity, NaN: json.dumps writes none)."""
        body = (
            f'{{"image": "{base64.b64encode(image).decode()}", "tasks": {json.dumps(tasks)}, "topk": {topk}}}'
        )
        return self.call("/predict", body.encode())

    def predict_form(self, image: bytes, tasks: str, topk=1, cut=None):
        """A multipart upload; ``cut``: the body's first ``cut`` bytes only (a form cut short; -38: all of it
        but its closing boundary)."""
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
        body = b"".join(parts)
        return self.call("/predict", body[:cut], f"multipart/form-data; boundary={boundary}")


def _start(args: list[str], log_path: Path) -> tuple[subprocess.Popen, Client]:
    """``selfprompt serve ARGS`` in a session of its own, once ``/health`` answers 200."""
    port = int(args[args.index("--port") + 1])
    log = open(log_path, "w")  # noqa: SIM115  (the child writes it; closed here, the child keeps its copy)
    server = subprocess.Popen(
        SERVE + args, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    client = Client(port)
    for _ in range(240):
        if server.poll() is not None:
            raise RuntimeError(log_path.read_text()[-3000:])
        try:
            if client.call("/health", token=False)[0] == 200:
                return server, client
        except OSError:
            pass
        time.sleep(0.25)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("the server did not start in 60 s")


def _stop(server: subprocess.Popen) -> None:
    """The session the test started: the server and its workers."""
    try:
        os.killpg(server.pid, signal.SIGKILL if server.poll() is not None else signal.SIGTERM)
    except ProcessLookupError:  # none of it is left
        return
    server.wait(timeout=30)


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
    args = [
        "--adapter", f"run={root / 'run'}", f"shallow={root / 'shallow'}", "--backbone", ZOO,
        "--port", str(_free_port()), "--max_tasks", "2", "--max_pixels", "10000", "--max_bytes", "200000",
        "--token", TOKEN, "--max_batch_size", "16", "--batch_timeout", "0.05",
    ]  # fmt: skip
    server, client = _start(args, root / "server.log")
    try:
        yield client, root, data
    finally:
        _stop(server)


def _good(client):
    status, body = client.predict(_png(), ["run", "shallow"], topk=2)
    assert status == 200, body
    assert set(body["predictions"]) == {"run", "shallow"}


@pytest.mark.slow
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


@pytest.mark.slow
def test_tasks_and_health(served):
    client, _, _ = served
    status, body = client.call("/tasks")
    assert status == 200 and set(body["tasks"]) == {"run", "shallow"}
    assert body["tasks"]["run"]["classes"] == ["class0", "class1", "class2"]
    assert client.call("/health")[0] == 200
    assert client.call("/health", token=False)[0] == 200  # probes carry no credentials


def _truncated_png() -> bytes:
    return _png()[:60]


@pytest.mark.slow
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
        ("topk 1e400", 400),
        ("topk Infinity", 400),
        ("topk NaN", 400),
        ("topk 1.7", 400),
        ("topk true", 400),
        ("topk as text", 400),
        ("form topk 1.7", 400),
        ("json nested 1000 deep", 400),
        ("wrong content type", 415),
        ("malformed form", 400),
        ("form cut short", 400),
        ("form without closing boundary", 400),
        ("no token", 401),
        ("wrong token", 401),
        ("non-ascii token", 401),
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
        **_bad_topk(client),
        "form topk 1.7": lambda: client.predict_form(_png(), "run", topk="1.7"),
        "json nested 1000 deep": lambda: client.call("/predict", _deep_json()),
        "wrong content type": lambda: client.call("/predict", b"x", "text/plain"),
        "malformed form": lambda: client.call("/predict", b"garbage", "multipart/form-data; boundary=zz"),
        "form cut short": lambda: client.predict_form(_png(), "run", cut=150),
        "form without closing boundary": lambda: client.predict_form(_png(), "run", cut=-38),
        "no token": lambda: client.call("/predict", b"{}", token=False),
        "wrong token": lambda: Client(_port(client), "wrong").predict(_png(), ["run"]),
        "non-ascii token": lambda: Client(_port(client), "s3cret-tökén").predict(_png(), ["run"]),
    }
    got, body = calls[case]()
    assert got == status, body
    assert isinstance(body.get("detail"), str) and body["detail"]
    if case == "json nested 1000 deep":
        assert str(MAX_JSON_DEPTH) in body["detail"]
    if case.startswith("form") and "topk" not in case:
        assert "incomplete" in body["detail"]
    _good(client)


def _port(client: Client) -> int:
    return int(client.base.rsplit(":", 1)[1])


def _deep_json() -> bytes:
    return b"[" * 1000 + b"]" * 1000  # 2 KB


def _bad_topk(client: Client) -> dict:
    """The topk values that are no JSON integer, as the JSON text writes them."""
    literals = {"1e400": "1e400", "Infinity": "Infinity", "NaN": "NaN", "1.7": "1.7", "true": "true"}
    calls = {
        f"topk {k}": (lambda v=v: client.predict_literal(_png(), ["run"], v)) for k, v in literals.items()
    }
    return {**calls, "topk as text": lambda: client.predict(_png(), ["run"], topk="3")}


@pytest.mark.slow
def test_bad_requests_batched_with_good_ones_leave_them_untouched(served):
    """24 good requests sent at once, in among bad ones that reach the model's process (and some that do
    not): the server batches them (up to 16 a batch, 50 ms to fill) and every good one gets the answer
    ``selfprompt predict`` gives."""
    client, root, data = served
    files = sorted((data / "test").rglob("*.png"))[:8]
    offline = predict_run(root / "run", [str(f) for f in files], None, "final", "cpu", topk=2)
    expected = {f.name: row for f, row in zip(files, offline, strict=True)}
    bad = [
        *_bad_topk(client).values(),
        lambda: client.predict(_png(), ["nope"]),
        lambda: client.predict(_truncated_png(), ["run"]),
        lambda: client.predict(_png((200, 200)), ["run"]),
        lambda: client.call("/predict", _deep_json()),
        lambda: client.predict_form(_png(), "run", cut=-38),
    ]

    def good(i: int):
        path = files[i % len(files)]
        if i % 2:
            return path.name, client.predict_form(path.read_bytes(), "run", topk=2)
        return path.name, client.predict(path.read_bytes(), ["run"], topk=2)

    calls = [lambda i=i: good(i) for i in range(24)]
    for i, call in enumerate(bad * 2):
        calls.insert(2 * i + 1, lambda call=call: (None, call()))
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda call: call(), calls))
    assert sum(name is not None for name, _ in answers) == 24
    for name, (status, body) in answers:
        if name is None:
            assert status in (400, 404, 413), body
            continue
        assert status == 200, body
        row, got = expected[name], body["predictions"]["run"]
        assert [g["class"] for g in got] == [row["class_1"], row["class_2"]]
        assert abs(got[0]["probability"] - row["probability_1"]) <= 2e-6


@pytest.mark.slow
def test_tasks_listing_needs_the_token(served):
    client, _, _ = served
    assert client.call("/tasks", token=False)[0] == 401


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[{{{", "b": "\\\\", "c": "\\"[["}') == 1
    assert json_depth(b"12") == 0
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


@pytest.fixture()
def api(served):
    """The server's API in this process (no HTTP), as its worker sets it up."""
    from selfprompt.serving.server import MultiTaskAPI

    _, root, _ = served
    settings = ServeSettings({"run": root / "run", "shallow": root / "shallow"}, backbone=ZOO)
    api = MultiTaskAPI(settings, max_batch_size=16, batch_timeout=0.05)
    on_sigint = signal.getsignal(signal.SIGINT)
    with torch.enable_grad():  # setup turns autograd off and ignores SIGINT in its process (a worker's)
        api.setup("cpu")
    signal.signal(signal.SIGINT, on_sigint)
    return api


def _request(tasks=("run",), topk=1) -> dict:
    return {"image": base64.b64encode(_png()).decode(), "tasks": list(tasks), "topk": topk}


@pytest.mark.slow
def test_an_unexpected_error_reading_a_request_is_its_own_500(api, monkeypatch, caplog):
    def broken(data, max_pixels):
        raise RuntimeError("a bug in decoding")

    monkeypatch.setattr("selfprompt.serving.server.decode_image", broken)
    with caplog.at_level("ERROR", logger="selfprompt.serving.server"):
        got = api.decode_request(_request())
    assert isinstance(got, Invalid) and got.status == 500
    assert "a bug in decoding" in caplog.text  # the traceback is logged


@pytest.mark.slow
def test_a_request_whose_forward_fails_fails_alone(api, caplog):
    good = [api.decode_request(_request(("run", "shallow"), topk=2)) for _ in range(3)]
    image = torch.zeros(3, 16, 16)  # a size the backbone refuses: stacking the batch fails, then its forward
    bad = Job({"run": image}, ["run"], 1)
    with caplog.at_level("ERROR", logger="selfprompt.serving.server"):
        answers = api.predict([good[0], bad, Invalid(400, "no"), good[1], good[2]])
    assert isinstance(answers[1], Invalid) and answers[1].status == 500
    assert answers[2] == Invalid(400, "no")
    alone = api.predict([good[0]])[0]
    for answer in (answers[0], answers[3], answers[4]):
        assert answer == alone
    responses = [api.encode_response(a) for a in answers]
    assert [r.status_code for r in responses] == [200, 500, 400, 200, 200]
    assert "one by one" in caplog.text


@pytest.mark.slow
def test_a_response_that_cannot_be_encoded_is_a_500(api):
    nan = {"predictions": {"run": [{"class": "class0", "probability": float("nan")}]}}
    assert api.encode_response(nan).status_code == 500


def _children(pid: int) -> list[int]:
    """The processes under ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's processes in /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_server_process_stops_every_process_of_it(served, tmp_path, signum):
    _, root, _ = served
    port = _free_port()
    args = ["--adapter", f"shallow={root / 'shallow'}", "--backbone", ZOO, "--port", str(port)]
    server, client = _start(args, tmp_path / "server.log")
    try:
        children = _children(server.pid)
        assert len(children) >= 3, children  # LitServe's manager, the model's worker, the HTTP server
        assert client.predict(_png(), ["shallow"])[0] == 200
        server.send_signal(signum)  # to the main process alone, not to its process group
        deadline = time.monotonic() + 10
        assert server.wait(timeout=10) == 0, (tmp_path / "server.log").read_text()[-3000:]
        while [p for p in children if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if _alive(p)], (tmp_path / "server.log").read_text()[-3000:]
        with socket.socket() as s:  # the port is free: nothing listens on it any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        _stop(server)


@pytest.mark.slow
def test_an_adapter_of_another_backbone_is_refused_before_any_worker_starts(served):
    _, root, _ = served
    command = [
        *SERVE,
        "--adapter",
        f"shallow={root / 'shallow'}",
        "--backbone",
        "vit_mini_patch4_32.sup_fmnist",
    ]
    done = subprocess.run(
        [*command, "--port", str(_free_port())], env=ENV, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "litserve" not in output.lower(), output
    errors = [line for line in output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("selfprompt serve: error: The backbone does not match")
