"""``selfprompt serve``: a :class:`MultiTaskViT` behind LitServe's HTTP layer and dynamic batching.

LitServe gathers concurrent requests into one batch (``max_batch_size``, ``batch_timeout``); each request
(one image, one or several task names) becomes one row per task, and the whole batch runs as one mixed-task
forward. Endpoints: ``POST /predict`` (multipart ``image`` upload or JSON ``{"image": <base64>}``, plus
``tasks`` and ``topk``), ``GET /tasks``, ``GET /health`` (LitServe's).

A bad request never reaches the model as an exception: LitServe fails a whole batch when one request raises,
so ``decode_request`` turns a bad input into an :class:`Invalid` that ``encode_response`` answers with its
4xx, and the other requests of the batch are served. Bodies are checked (size, JSON syntax, content type) by
:class:`BodyGuard` before they are queued.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprompt.adapter import read_config
from selfprompt.data.images import to_rgb
from selfprompt.data.splits import eval_transform
from selfprompt.data.transforms import build_transform, data_config
from selfprompt.serving.loading import load_multitask
from selfprompt.serving.sources import resolve_source

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import litserve as ls
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
except ImportError:  # the serve extra is optional; serve() says how to install it
    ls = None

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_TASKS = 16
DEFAULT_MAX_TOPK = 20
TOKEN_ENV = "SELFPROMPT_SERVE_TOKEN"


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
        token: Bearer token every request must carry (None: no authentication).
        allowed_root: When set, every adapter folder must lie under it.
        device: ``cpu``, ``cuda``, ...
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
        config = read_config(source.adapter)
        listing[name] = {
            "method_class": config["class"],
            "num_classes": config["model"]["num_classes"],
            "classes": source.classes,
        }
    return listing


class BodyGuard:
    """ASGI middleware for ``POST <path>``: a body over ``max_bytes`` gets 413, a JSON body that does not
    parse 400, another content type than JSON or multipart 415, before LitServe queues the request."""

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
            try:
                json.loads(body)
            except (ValueError, UnicodeDecodeError) as error:
                return await _reply(send, 400, f"Malformed JSON body: {error}.")
        else:
            body = await _form_as_json(scope, body)
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


async def _form_as_json(scope, body: bytes) -> bytes | Invalid:
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
        uploads = [u for u in form.getlist("image") if hasattr(u, "read")]
        if len(uploads) != 1:
            return Invalid(400, "A multipart request carries exactly one file field named 'image'.")
        data = await uploads[0].read()
        values = [str(v) for v in form.getlist("tasks") + form.getlist("task")]
        tasks = [t.strip() for value in values for t in value.split(",") if t.strip()]
        request = {"image": base64.b64encode(data).decode(), "tasks": tasks, "topk": form.get("topk", 1)}
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


if ls is not None:

    class MultiTaskAPI(ls.LitAPI):
        """LitServe's API around a :class:`MultiTaskViT`: decode per request, one mixed forward per batch."""

        def __init__(self, settings: ServeSettings, **batching: Any) -> None:
            super().__init__(**batching)
            self.settings = settings
            self.bearer = HTTPBearer(auto_error=False)

        def setup(self, device: str) -> None:
            torch.set_grad_enabled(False)
            s = self.settings
            self.model = load_multitask(s.adapters, s.backbone, s.stage).to(s.device).eval()
            backbone = self.model.backbone
            self.transforms = {}
            for name, task in self.model.tasks.items():
                cfg = task.data
                self.transforms[name] = (
                    eval_transform(cfg, backbone)
                    if cfg
                    else build_transform(data_config(backbone), train=False)
                )

        def authorize(
            self,
            auth: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False)),  # noqa: B008
        ):
            expected = self.settings.token
            if expected and (auth is None or not hmac.compare_digest(auth.credentials, expected)):
                raise HTTPException(401, "A valid 'Authorization: Bearer <token>' header is required.")

        def decode_request(self, request: Request) -> Job | Invalid:
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
            try:
                topk = int(topk)
            except (TypeError, ValueError):
                return Invalid(400, f"topk must be an integer, got {topk!r}.")
            if not 1 <= topk <= DEFAULT_MAX_TOPK:
                return Invalid(400, f"topk must be in [1, {DEFAULT_MAX_TOPK}], got {topk}.")
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
            rows = [(j, t) for j in jobs if isinstance(j, Job) for t in j.tasks]
            results: dict[int, dict] = {}
            if rows:
                device = self.model.device
                images = torch.stack([j.images[t] for j, t in rows]).to(device)
                with torch.inference_mode():
                    logits = self.model(images, [t for _, t in rows])
                for (job, task), row in zip(rows, logits, strict=True):
                    probs = row.float().softmax(dim=0)
                    top = probs.topk(min(job.topk, probs.numel()))
                    classes = self.model.tasks[task].classes
                    results.setdefault(id(job), {})[task] = [
                        {"class": classes[i], "probability": round(p, 6)}
                        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ]
            return [j if isinstance(j, Invalid) else {"predictions": results[id(j)]} for j in jobs]

        def batch(self, inputs: list) -> list:
            return inputs

        def unbatch(self, output: list) -> list:
            return output

        def encode_response(self, output: dict | Invalid) -> JSONResponse:
            if isinstance(output, Invalid):
                return JSONResponse({"detail": output.detail}, status_code=output.status)
            return JSONResponse(output)

    # LitServe reads these annotations as objects (the module's postponed annotations are strings): Request
    # makes it parse the JSON or form body into plain data before queueing it to the model's process
    MultiTaskAPI.decode_request.__annotations__["request"] = Request
    MultiTaskAPI.encode_response.__annotations__["return"] = JSONResponse


def build_server(settings: ServeSettings):
    """The LitServer (not started) with ``/tasks`` and the body guard."""
    try:
        import python_multipart  # noqa: F401  (python-multipart: starlette's form parser, for uploads)
    except ImportError:
        ls_missing = True
    else:
        ls_missing = ls is None
    if ls_missing:
        raise ImportError(
            "selfprompt serve needs LitServe and python-multipart: pip install 'selfprompt[serve]'."
        )
    listing = check_adapters(settings)
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
    return server


def serve(settings: ServeSettings) -> None:
    settings.token = settings.token or os.environ.get(TOKEN_ENV) or None
    server = build_server(settings)
    server.run(host=settings.host, port=settings.port, generate_client_file=False)
