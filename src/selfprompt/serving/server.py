"""``selfprompt serve``: a :class:`MultiTaskViT` behind LitServe's HTTP layer and dynamic batching.

LitServe gathers concurrent requests into one batch (``max_batch_size``, ``batch_timeout``); each request
(one image, one or several task names) becomes one row per task, and the whole batch runs as one mixed-task
forward. Endpoints: ``POST /predict`` (multipart ``image`` upload or JSON ``{"image": <base64>}``, plus
``tasks`` and ``topk``), ``GET /tasks``, ``GET /health`` (LitServe's; open without the token, for load
balancers and probes).

One request's failure stays its own: LitServe fails a whole batch when one request raises, so
``decode_request`` validates each request completely and turns a bad input into an :class:`Invalid` (its 4xx;
an unexpected error there is that request's 500, logged with its traceback), ``predict`` runs the forward over
the valid requests only and, when a batch's forward fails, each request alone, and ``encode_response`` cannot
raise. Bodies are checked (size, JSON syntax and nesting, complete multipart form, content type) by
:class:`BodyGuard` before they are queued. SIGTERM or SIGINT to the main process stops every process of the
server (:func:`serve`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from selfprompt.data.images import to_rgb
from selfprompt.serving.loading import load_multitask
from selfprompt.serving.sources import resolve_source

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import litserve as ls
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from python_multipart.multipart import parse_options_header
except ImportError:  # the serve extra is optional; build_server() says how to install it
    ls = None

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_TASKS = 16
DEFAULT_MAX_TOPK = 20
TOKEN_ENV = "SELFPROMPT_SERVE_TOKEN"
MAX_JSON_DEPTH = 32  # a request nests 2 levels; a deeper body is refused before any parser recurses into it
OPEN_PATHS = ("/health",)  # answered without the token: load balancers and probes carry no credentials
STOP_GRACE = 4.0  # seconds requests in flight get to finish after SIGTERM/SIGINT before the processes end
INTERNAL = "The server failed on this request; its log has the details."

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """What ``selfprompt serve`` starts with.

    Attributes:
        adapters: Task name -> adapter or run folder.
        backbone: timm name or weights file (None: the first adapter's).
        stage: A run folder's stage (None: final, else tune).
        host, port: Where to listen (127.0.0.1 by default: localhost only).
        max_batch_size, batch_timeout: LitServe's dynamic batching: requests per batch, seconds to wait.
        max_tasks: Task names one request may ask for.
        max_pixels, max_bytes: Largest image (width x height) and request body accepted.
        token: Bearer token every request but ``GET /health`` must carry (None: no authentication).
        allowed_root: When set, every adapter folder must lie under it.
        device: ``cpu``, ``cuda``, ...
        check_weights: Refuse an adapter whose backbone weights are not the ones served.
    """

    adapters: dict[str, Path]
    backbone: str | None = None
    stage: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.01
    max_tasks: int = DEFAULT_MAX_TASKS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    token: str | None = None
    allowed_root: Path | None = None
    device: str = "cpu"
    check_weights: bool = True


@dataclass(frozen=True)
class Invalid:
    """A request that cannot be served: its HTTP status and the reason."""

    status: int
    detail: str


@dataclass(frozen=True)
class Job:
    images: dict[str, torch.Tensor]  # task -> the image under that task's transform
    tasks: list[str]
    topk: int


def check_adapters(settings: ServeSettings) -> dict[str, dict[str, Any]]:
    """The tasks as ``GET /tasks`` lists them; refuses folders outside ``allowed_root``."""
    listing = {}
    for name, path in settings.adapters.items():
        if settings.allowed_root is not None:
            root = settings.allowed_root.resolve()
            if not path.resolve().is_relative_to(root):
                raise ValueError(f"Adapter {name}={path} lies outside the allowed root {root}.")
        source = resolve_source(path, stage=settings.stage)
        config = source.config
        listing[name] = {
            "method_class": config["class"],
            "num_classes": config["model"]["num_classes"],
            "classes": source.classes,
        }
    return listing


class BodyGuard:
    """ASGI middleware for ``POST <path>``: a body over ``max_bytes`` gets 413, a JSON body that does not
    parse or nests deeper than :data:`MAX_JSON_DEPTH` 400, a malformed or incomplete multipart form 400,
    another content type than JSON or multipart 415, before LitServe queues the request."""

    def __init__(self, app, path: str, max_bytes: int) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            return await _reply(send, 415, "Send the image as multipart/form-data or as application/json.")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _reply(send, 413, f"The request body is over the limit of {self.max_bytes} bytes.")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _reply(
                    send, 413, f"The request body is over the limit of {self.max_bytes} bytes."
                )
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if kind == "application/json":
            problem = _json_problem(body)
            if problem is not None:
                return await _reply(send, 400, problem)
        else:
            body = await _form_as_json(scope, body, headers["content-type"])
            if isinstance(body, Invalid):
                return await _reply(send, body.status, body.detail)
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")
            ] + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


_STRING = re.compile(rb'"[^"]*"')  # a JSON string once its escaped backslashes and quotes are removed
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 and -1 as signed bytes


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, counted without parsing it (no recursion, C loops
    only): the brackets outside strings, as a running sum of +1 and -1."""
    plain = _STRING.sub(b"", body.replace(b"\\\\", b"").replace(b'\\"', b""))
    return max(accumulate(array("b", plain.translate(_STEP, _NOT_BRACKET))), default=0)


def _json_problem(body: bytes) -> str | None:
    """Why a JSON body is refused (nested too deep, not JSON), or None."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        return f"The JSON body nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}."
    try:
        json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as error:
        return f"Malformed JSON body: {error}."
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def _form_as_json(scope, body: bytes, content_type: str) -> bytes | Invalid:
    """A multipart form as the JSON request (image as base64): LitServe hands the parsed body to the model's
    process by pickling it, which an upload's spooled file does not survive."""

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form(max_files=2, max_fields=64)
    except HTTPException as error:  # starlette's answer to a malformed form
        return Invalid(400, f"Malformed multipart form: {error.detail}")
    except Exception as error:
        return Invalid(400, f"Malformed multipart form: {error}")
    try:
        boundary = parse_options_header(content_type)[1][b"boundary"]
        if b"--" + boundary + b"--" not in body:  # the parser takes a form cut short for a complete one
            return Invalid(400, "Malformed multipart form: it is incomplete (no closing boundary).")
        uploads = [u for u in form.getlist("image") if hasattr(u, "read")]
        if len(uploads) != 1:
            return Invalid(400, "A multipart request carries exactly one file field named 'image'.")
        topk = form.get("topk", "1")
        if not isinstance(topk, str):
            return Invalid(400, "topk is a text field, not a file.")
        data = await uploads[0].read()
        values = [v for v in form.getlist("tasks") + form.getlist("task") if isinstance(v, str)]
        tasks = [t.strip() for value in values for t in value.split(",") if t.strip()]
        topk = int(topk) if re.fullmatch(r"[0-9]{1,6}", topk.strip()) else topk  # else refused as text
        request = {"image": base64.b64encode(data).decode(), "tasks": tasks, "topk": topk}
        return json.dumps(request).encode()
    finally:
        await form.close()


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def decode_image(data: bytes, max_pixels: int) -> Image.Image | Invalid:
    """Upright 8-bit RGB, or why not (empty, not an image, corrupt, too many pixels)."""
    if not data:
        return Invalid(400, "The image is empty (0 bytes).")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return Invalid(413, f"The image has {width}x{height} pixels, over the limit of {max_pixels}.")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
    except UnidentifiedImageError:
        return Invalid(400, "The upload is not an image (no format PIL reads: PNG, JPEG, WebP, ...).")
    except Image.DecompressionBombError as error:
        return Invalid(413, f"The image is too large: {error}")
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return Invalid(400, f"The upload is not a readable image: {error}")


def _fields(request: Any) -> tuple[bytes | None, list[str] | None, Any] | Invalid:
    """(image bytes, task names, topk) from the JSON object (a multipart form arrives converted)."""
    if isinstance(request, dict):
        image = request.get("image")
        if not isinstance(image, str):
            return Invalid(
                400, 'JSON requests carry the image as base64 text: {"image": "...", "tasks": [...]}.'
            )
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            return Invalid(400, "The image field is not valid base64.")
        tasks = request.get("tasks", request.get("task"))
        tasks = [tasks] if isinstance(tasks, str) else tasks
        return data, tasks, request.get("topk", 1)
    return Invalid(400, "Send a JSON object or a multipart form.")


def _topk(value: Any) -> int | Invalid:
    """``topk`` as sent: a JSON integer in [1, DEFAULT_MAX_TOPK] (not 1.7, true, 1e400, "3")."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= DEFAULT_MAX_TOPK:
        return value
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return Invalid(400, f"topk must be an integer from 1 to {DEFAULT_MAX_TOPK}, got {shown}.")


if ls is not None:

    class MultiTaskAPI(ls.LitAPI):
        """LitServe's API around a :class:`MultiTaskViT`: decode per request, one mixed forward per batch."""

        def __init__(self, settings: ServeSettings, **batching: Any) -> None:
            super().__init__(**batching)
            self.settings = settings

        def setup(self, device: str) -> None:
            # Ctrl+C in a terminal signals the whole process group: the main process stops this one (serve)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            torch.set_grad_enabled(False)
            s = self.settings
            self.model = load_multitask(s.adapters, s.backbone, s.stage, s.check_weights).to(s.device).eval()
            backbone = self.model.backbone
            self.transforms = {
                name: task.source.transform(backbone) for name, task in self.model.tasks.items()
            }

        def authorize(
            self,
            request: Request,
            auth: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False)),  # noqa: B008
        ) -> None:
            expected = self.settings.token
            if not expected or request.url.path in OPEN_PATHS:
                return
            # as bytes: compare_digest refuses str with non-ASCII characters
            if auth is None or not hmac.compare_digest(auth.credentials.encode(), expected.encode()):
                raise HTTPException(401, "A valid 'Authorization: Bearer <token>' header is required.")

        def decode_request(self, request: Request) -> Job | Invalid:
            """The request as a :class:`Job`, or why not: a bad input is its 4xx, any other error its 500."""
            try:
                return self._decode(request)
            except Exception:
                log.exception("Reading a request failed (answered 500, the rest of its batch is served)")
                return Invalid(500, INTERNAL)

        def _decode(self, request: Any) -> Job | Invalid:
            fields = _fields(request)
            if isinstance(fields, Invalid):
                return fields
            data, tasks, topk = fields
            served = self.model.tasks
            if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
                return Invalid(400, f"Name one or more tasks ('tasks'); served: {sorted(served)}.")
            tasks = list(dict.fromkeys(tasks))
            if len(tasks) > self.settings.max_tasks:
                return Invalid(
                    400, f"{len(tasks)} tasks asked for; at most {self.settings.max_tasks} a request."
                )
            unknown = [t for t in tasks if t not in served]
            if unknown:
                return Invalid(404, f"Unknown task(s) {unknown}; served: {sorted(served)}.")
            topk = _topk(topk)
            if isinstance(topk, Invalid):
                return topk
            image = decode_image(data, self.settings.max_pixels)
            if isinstance(image, Invalid):
                return image
            images, by_transform = {}, {}
            for task in tasks:
                transform = self.transforms[task]
                key = repr(transform)
                if key not in by_transform:
                    by_transform[key] = transform(image)
                images[task] = by_transform[key]
            return Job(images, tasks, topk)

        def predict(self, jobs: list[Job | Invalid]) -> list[dict | Invalid]:
            answers = self._answer([j for j in jobs if isinstance(j, Job)])
            return [answers[id(j)] if isinstance(j, Job) else j for j in jobs]

        def _answer(self, jobs: list[Job]) -> dict[int, dict | Invalid]:
            """id(job) -> its predictions: one forward over all ``jobs``; should it fail, each job alone, so
            that a failure is the 500 of the request that causes it."""
            try:
                return self._forward(jobs)
            except Exception:
                if len(jobs) == 1:
                    log.exception("The forward of a request failed (answered 500)")
                    return {id(jobs[0]): Invalid(500, INTERNAL)}
                log.exception("The forward of %d requests failed; running them one by one", len(jobs))
                return {key: answer for job in jobs for key, answer in self._answer([job]).items()}

        def _forward(self, jobs: list[Job]) -> dict[int, dict]:
            rows = [(j, t) for j in jobs for t in j.tasks]
            if not rows:
                return {}
            images = torch.stack([j.images[t] for j, t in rows]).to(self.model.device)
            with torch.inference_mode():
                logits = self.model(images, [t for _, t in rows])
            results: dict[int, dict] = {id(j): {} for j in jobs}
            for (job, task), row in zip(rows, logits, strict=True):
                probs = row.float().softmax(dim=0)
                top = probs.topk(min(job.topk, probs.numel()))
                classes = self.model.tasks[task].classes
                results[id(job)][task] = [
                    {"class": classes[i], "probability": round(p, 6)}
                    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ]
            return {key: {"predictions": predictions} for key, predictions in results.items()}

        def batch(self, inputs: list) -> list:
            return inputs

        def unbatch(self, output: list) -> list:
            return output

        def encode_response(self, output: dict | Invalid) -> JSONResponse:
            try:
                if isinstance(output, Invalid):
                    return JSONResponse({"detail": output.detail}, status_code=output.status)
                return JSONResponse(output)  # refuses NaN and infinite probabilities
            except Exception:
                log.exception("Encoding a response failed (answered 500)")
                return JSONResponse({"detail": INTERNAL}, status_code=500)

    # LitServe reads these annotations as objects (the module's postponed annotations are strings): Request
    # makes it parse the JSON or form body into plain data before queueing it to the model's process
    MultiTaskAPI.decode_request.__annotations__["request"] = Request
    MultiTaskAPI.encode_response.__annotations__["return"] = JSONResponse


def build_server(settings: ServeSettings):
    """The LitServer (not started) with ``/tasks`` and the body guard.

    The tasks are loaded here once, in this process, as the model's worker will load them: an adapter made
    for another backbone, or otherwise unreadable, is refused before any worker starts (this costs one more
    load of the backbone at start-up; the model is dropped at once).
    """
    if ls is None:
        raise ImportError(
            "selfprompt serve needs LitServe and python-multipart: pip install 'selfprompt[serve]'."
        )
    listing = check_adapters(settings)
    load_multitask(settings.adapters, settings.backbone, settings.stage, settings.check_weights)
    api = MultiTaskAPI(settings, max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout)
    server = ls.LitServer(
        api,
        accelerator="cuda" if settings.device.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=1,
        timeout=60,
        middlewares=[(BodyGuard, {"path": "/predict", "max_bytes": settings.max_bytes})],
    )

    def tasks(_: None = Depends(api.authorize)) -> dict[str, Any]:
        return {"tasks": listing}

    server.app.add_api_route("/tasks", tasks, methods=["GET"])
    server.uvicorn_graceful_timeout = STOP_GRACE  # how long its HTTP processes wait for in-flight requests
    return server


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGTERM or SIGINT (to the main process alone, or to its process group)."""
    settings.token = settings.token or os.environ.get(TOKEN_ENV) or None
    if settings.token is not None and not (settings.token.isascii() and settings.token.isprintable()):
        raise ValueError(f"The token (--token or ${TOKEN_ENV}) must be printable ASCII, as HTTP headers are.")
    server = build_server(settings)
    with _stopped_by_signals(server):
        server.run(host=settings.host, port=settings.port, generate_client_file=False)


@contextmanager
def _stopped_by_signals(server) -> Iterator[None]:
    """SIGTERM or SIGINT to this process stops every process of the server, and the port is free again.

    LitServe's processes only stop together on Ctrl+C in a terminal, which signals the whole process group;
    ``kill PID`` or a container's stop reaches the main process alone, which ended and left the workers
    holding the port. Here the first signal sets LitServe's shutdown event (the path of its own shutdown:
    requests in flight are answered, then its processes are ended); if the server is still starting, or still
    running :data:`STOP_GRACE` seconds later, or a second signal comes, the main thread is interrupted; on the
    way out every child process still alive is ended. An error once stopping has begun is logged in one
    line (a signal to the process group also ends LitServe's manager process, which its shutdown uses).
    """
    main, done = os.getpid(), threading.Event()
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        if os.getpid() != main:  # a process forked from this one that has not set its own handlers yet
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif done.is_set():
            return
        elif stopping or server._shutdown_event is None:
            raise KeyboardInterrupt
        else:
            stopping = True
            threading.Thread(target=_stop, args=(server, signum, done), daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Exception as error:
        if not stopping:
            raise
        # a signal to the whole process group ended LitServe's manager process before its shutdown ran
        log.warning("While stopping: %r", error)
    finally:
        done.set()
        _end_children()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(server, signum: int, done: threading.Event) -> None:
    """Set LitServe's shutdown event; interrupt the main thread if it is still running after STOP_GRACE."""
    log.warning("%s: stopping the server.", signal.Signals(signum).name)
    with suppress(Exception):  # its manager process may be gone already (a signal to the process group)
        server._shutdown_event.set()
    if not done.wait(STOP_GRACE):
        signal.pthread_kill(threading.main_thread().ident, signum)


def _end_children(timeout: float = 2.0) -> None:
    """End the processes this one started that are still alive (TERM, then KILL after ``timeout``)."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(deadline - time.monotonic(), 0))
        if child.is_alive():
            child.kill()
            child.join(timeout)
