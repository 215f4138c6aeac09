"""Training-step time of every registered method against the floor of ``benchmarks/prompt_overhead.py``;
inference time of merged LoRA and re-parameterised SSF against their unmerged models.

1. Training step (forward + backward + AdamW step over the method's adapter parameters) of every method,
   each built with its settings section's defaults (VPT-deep with M prompts), against timm's own
   VisionTransformer with ``reg_tokens=M`` and only those tokens + head trainable (the prompt floor). Steps
   are interleaved round-robin so that machine drift hits all models alike; medians are reported.
2. Inference (no-grad forward, eval mode) of LoRA and SSF before and after ``merged()``, and of the plain
   backbone with the same head (linear probe), interleaved the same way.
3. ``--by-prompts``: the linear probe and each of ``--by-prompts-methods`` (default VPT-deep, APT, IPT, BPT)
   at each M of ``--by-prompts-counts``, all in one process and interleaved: median training step and
   inference, their ratios to the linear probe's, and memory (CUDA: the peak allocated in a step; CPU: the
   bytes autograd saves for the backward pass of one step).

Random weights; CPU unless CUDA is there.

    python benchmarks/method_step_time.py [--model vit_tiny_patch16_224] [--prompts 10] [--rounds 10]
        [--methods vpt-deep pc] [--no-inference]
    python benchmarks/method_step_time.py --by-prompts [--by-prompts-counts 10 50 100]
        [--by-prompts-methods vpt-deep apt ipt bpt] [--model vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import selfprompt as sp  # before timm (see README)
from selfprompt.config import TrainConfig
from selfprompt.methods.condensation import condense_at_random

import timm
import torch


def build(name: str, model_name: str, prompts: int, img_size: int = 224) -> sp.ViTClassifier:
    """``name``'s model with its default settings (M prompts for methods with prompts) on a random-weight
    ``model_name`` at ``img_size``; pc: its source (vpt-deep, M prompts) with a random 30% of the prompts
    kept. Also gpu_throughput.py's."""
    method, cfg = sp.get_method(name), TrainConfig()
    if method.condenses:
        return condense_at_random(build(method.condenses, model_name, prompts, img_size), 0.3)
    cfg.model.method = name
    if method.has_prompts:
        cfg.prompt.num_prompts = prompts
    torch.manual_seed(0)
    backbone = timm.create_model(model_name, num_classes=0, img_size=img_size)
    return method.create(backbone, 10, method.settings_of(cfg))


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], x, y) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for call in calls.values():  # warm-up
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def table(title: str, medians: dict[str, float], base: str, trainable: dict[str, int] | None = None) -> None:
    """One row per model: (trainable parameters,) median seconds and the ratio to ``base``'s."""
    print(f"\n{title}; ratios against {base}")
    print(f"{'model':28s} {'trainable' if trainable else '':>10s} {'median s':>9s} {'ratio':>8s}")
    for name, seconds in medians.items():
        count = f"{trainable[name]:10,d}" if trainable else " " * 10
        print(f"{name:28s} {count} {seconds:9.3f} {seconds / medians[base]:7.3f}x")


def step_times(args: argparse.Namespace, device: torch.device) -> None:
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    floor = timm.create_model(args.model, num_classes=10, reg_tokens=args.prompts).to(device).train()
    for name, p in floor.named_parameters():
        p.requires_grad_(name in ("reg_token", "head.weight", "head.bias"))
    floor_params = [p for p in floor.parameters() if p.requires_grad]
    steps = {"timm reg_tokens=M (floor)": train_step(floor, floor_params, x, y)}
    trainable = {"timm reg_tokens=M (floor)": sum(p.numel() for p in floor_params)}
    for name in args.methods:
        model = build(name, args.model, args.prompts).to(device).train()
        steps[name] = train_step(model, list(model.adapter_parameters().values()), x, y)
        trainable[name] = model.num_adapter_parameters()
    medians = interleaved(steps, args.rounds)
    table(
        f"Training step, {args.model}, batch {args.batch}, M={args.prompts}, median of {args.rounds} rounds",
        medians,
        "timm reg_tokens=M (floor)",
        trainable,
    )


def inference_times(args: argparse.Namespace, device: torch.device) -> None:
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    calls: dict[str, Callable[[], object]] = {}
    worst = {}
    for name in ("linear", "lora", "ssf"):
        model = build(name, args.model, args.prompts).to(device).eval()
        if name != "linear":
            with torch.no_grad():  # away from the identity start, so a wrong merge would show
                for p in model.adapter_parameters().values():
                    p.add_(torch.randn_like(p) * 0.02)
            merged = model.merged()
            with torch.no_grad():
                worst[name] = (merged(x) - model(x)).abs().max().item()
            calls[f"{name} merged"] = lambda m=merged: m(x)
        calls[name if name == "linear" else f"{name} unmerged"] = lambda m=model: m(x)
    with torch.no_grad():
        medians = interleaved(calls, args.rounds)
    table(
        f"Inference (no grad), {args.model}, batch {args.batch}, median of {args.rounds} rounds",
        medians,
        "linear",
    )
    print("max |logit difference| merged vs unmerged: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``step`` runs (each storage once).
    Also gpu_throughput.py's."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values())


def peak_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """The peak CUDA memory allocated while ``call`` runs; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def by_prompts(args: argparse.Namespace, device: torch.device) -> None:
    """The linear probe and each prompt method at each M: step and inference medians, ratios to linear,
    memory."""
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    models = {"linear": build("linear", args.model, 1).to(device)}
    for m in args.by_prompts_counts:
        for method in args.by_prompts_methods:
            models[f"{method} M={m}"] = build(method, args.model, m).to(device)
    steps = {
        name: train_step(model.train(), list(model.adapter_parameters().values()), x, y)
        for name, model in models.items()
    }
    memory = {name: (saved_bytes(step), peak_bytes(step, device)) for name, step in steps.items()}
    step_medians = interleaved(steps, args.rounds)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        infer = {name: (lambda m=model: m(x)) for name, model in models.items()}
        infer_memory = {name: peak_bytes(call, device) for name, call in infer.items()}
        infer_medians = interleaved(infer, args.rounds)
    title = f"Linear probe and {', '.join(args.by_prompts_methods)} by M, {args.model}, batch {args.batch}"
    print(f"\n{title}, median of {args.rounds} rounds; ratios against linear")
    print(
        f"{'model':16s} {'trainable':>10s} {'step s':>8s} {'ratio':>7s} {'infer s':>8s} {'ratio':>7s} "
        f"{'saved MB':>9s} {'peak MB step/infer':>19s}"
    )
    mb = lambda n: "-" if n is None else f"{n / 2**20:.1f}"  # noqa: E731
    for name, model in models.items():
        step, infer_s = step_medians[name], infer_medians[name]
        ratios = step / step_medians["linear"], infer_s / infer_medians["linear"]
        peak = f"{mb(memory[name][1])}/{mb(infer_memory[name])}"
        print(
            f"{name:16s} {model.num_adapter_parameters():10,d} {step:8.3f} {ratios[0]:6.2f}x "
            f"{infer_s:8.3f} {ratios[1]:6.2f}x {mb(memory[name][0]):>9s} {peak:>19s}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=sp.method_names(), choices=sp.method_names())
    parser.add_argument("--no-inference", action="store_true", help="Only the training steps.")
    parser.add_argument("--by-prompts", action="store_true", help="Only the prompt methods by M (3. above).")
    parser.add_argument("--by-prompts-counts", type=int, nargs="+", default=[10, 50, 100])
    prompt_methods = ["vpt-deep", "apt", "ipt", "bpt"]
    parser.add_argument("--by-prompts-methods", nargs="+", default=prompt_methods, choices=sp.method_names())
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, selfprompt {sp.__version__}, "
        f"{platform.machine()}, {device}, {torch.get_num_threads()} threads"
    )
    if args.by_prompts:
        by_prompts(args, device)
        return
    step_times(args, device)
    if not args.no_inference:
        inference_times(args, device)


if __name__ == "__main__":
    main()
