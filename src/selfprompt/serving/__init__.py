"""Serving trained adapters: many tasks on one frozen backbone (:class:`MultiTaskViT`), export to ONNX, and
the HTTP server (``selfprompt serve``, on LitServe)."""

from __future__ import annotations

from selfprompt.serving.multitask import MultiTaskViT, Task
from selfprompt.serving.sources import AdapterSource, resolve_source

__all__ = ["AdapterSource", "MultiTaskViT", "Task", "resolve_source"]
