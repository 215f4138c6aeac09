"""``selfprompt serve`` and ``selfprompt export``: trained adapters as an HTTP service or an ONNX file."""

from __future__ import annotations

from pathlib import Path

from selfprompt.cli.command import Command
from selfprompt.cli.common import check_weights_argument

from jsonargparse import ArgumentParser, Namespace


def _serve_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt serve",
        description="Serve many tasks from one frozen backbone over HTTP (LitServe): POST /predict, "
        "GET /tasks, GET /health. SIGTERM or SIGINT stops it (every process, the port freed).",
    )
    parser.add_argument(
        "--adapter",
        type=str,
        nargs="+",
        action="extend",
        required=True,
        help="NAME=DIR: an adapter or run folder.",
    )
    parser.add_argument("--backbone", type=str | None, default=None, help="timm name or weights file.")
    parser.add_argument(
        "--stage", type=str | None, default=None, help="Run stage (default: final, else tune)."
    )
    parser.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1 (default) or 0.0.0.0.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=16, help="Requests batched together.")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="Seconds a batch waits to fill.")
    parser.add_argument("--max_tasks", type=int, default=16, help="Task names one request may ask for.")
    parser.add_argument("--max_pixels", type=int, default=40_000_000, help="Largest image, width x height.")
    parser.add_argument("--max_bytes", type=int, default=20 * 1024 * 1024, help="Largest request body.")
    parser.add_argument(
        "--token",
        type=str | None,
        default=None,
        help="Bearer token required on /predict and /tasks (or $SELFPROMPT_SERVE_TOKEN); /health stays open.",
    )
    parser.add_argument(
        "--allowed_root", type=str | None, default=None, help="Refuse adapter folders outside this folder."
    )
    parser.add_argument("--device", type=str, default="cpu")
    return check_weights_argument(parser)


def _serve(args: Namespace) -> None:
    from selfprompt.serving.loading import parse_adapter_specs
    from selfprompt.serving.server import ServeSettings, serve

    d = args.as_dict()
    d.pop("__path__", None)
    adapters = parse_adapter_specs(d.pop("adapter"))
    root = d.pop("allowed_root")
    serve(ServeSettings(adapters, allowed_root=Path(root) if root else None, **d))


def _export_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt export",
        description="Export a trained adapter (one task) or several (one multi-task graph with a task-id "
        "input) to ONNX, checked against PyTorch with onnxruntime.",
    )
    parser.add_argument("sources", nargs="+", type=str, help="RUN_OR_ADAPTER, or NAME=DIR for several.")
    parser.add_argument(
        "--format", type=str, default="onnx",
        help="onnx, or peft (a LoRA adapter in peft's format, for peft.PeftModel.from_pretrained).",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=str, required=True, help="The .onnx file (a .json beside it), or the peft folder."
    )
    parser.add_argument("--backbone", type=str | None, default=None, help="timm name or weights file.")
    parser.add_argument(
        "--stage", type=str | None, default=None, help="Run stage (default: final, else tune)."
    )
    parser.add_argument("--multitask", type=bool, default=False, help="A task-id input even for one source.")
    parser.add_argument("--verify", type=bool, default=True, help="Compare with PyTorch in onnxruntime.")
    return check_weights_argument(parser)


def _export(args: Namespace) -> None:
    from selfprompt.serving.export import run_export, run_peft_export

    if args.format == "peft":
        if len(args.sources) != 1 or args.multitask:
            raise ValueError("--format peft exports one LoRA adapter (one source, no --multitask).")
        source, output = args.sources[0], args.output
        print(run_peft_export(source, output, args.backbone, args.stage, args.verify, args.check_weights))
        return
    if args.format != "onnx":
        raise ValueError(f"--format must be onnx or peft, got {args.format!r}.")
    report = run_export(
        args.sources,
        args.output,
        args.backbone,
        args.stage,
        args.multitask,
        args.verify,
        check_weights=args.check_weights,
    )
    print(report)


COMMANDS = [
    Command(
        "serve", "Serve many tasks from one frozen backbone over HTTP (LitServe).", _serve_parser, _serve
    ),
    Command(
        "export",
        "Export adapters to ONNX (one task, or many with a task-id input) or LoRA to peft's format.",
        _export_parser,
        _export,
    ),
]
