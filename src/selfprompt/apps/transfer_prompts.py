"""``selfprompt transfer-prompts``: initial prompts taken from prompts trained on other tasks (PPT-style).

Sources are run folders (their ``seed``/``stage`` adapter, as ``serve`` reads them), adapter folders, or
prompts files (``init-prompts``, ``meta-prompts`` or this command's). All must hold prompts for the same
backbone. The prompts file written here is what ``--prompt.file`` starts a run from:

- ``mean``: the element-wise mean of the sources' first ``num_prompts`` prompts of each layer (every source
  needs at least that many);
- ``concat``: the sources' prompts interleaved token by token (the first prompt of every source, then the
  second of every source, ...) and cut to ``num_prompts``, so each source gives an equal share.

With one source either gives that source's prompts exactly. Layers past the target's are dropped (a deep
source can start a shallow run from its first layer); a source with fewer prompted layers is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from selfprompt.adapter import SIGNATURE_KEYS, WEIGHTS_NAME, read_tensors
from selfprompt.methods.prompt import prompts_file_metadata, save_prompts_file
from selfprompt.serving.sources import resolve_source

import torch

COMBINE = ("mean", "concat")


def source_prompts(
    path: str | Path, seed: int | None = None, stage: str | None = None
) -> tuple[torch.Tensor, dict]:
    """``(prompts (layers, M, D), backbone signature or {})`` of a run or adapter folder or a prompts file."""
    path = Path(path).expanduser()
    if path.is_file():
        return _prompts_of(path), prompts_file_metadata(path).get("signature") or {}
    source = resolve_source(path, seed, stage)
    signature = {k: source.config["backbone"].get(k) for k in SIGNATURE_KEYS}
    return _prompts_of(source.adapter / WEIGHTS_NAME, source.config.get("class")), signature


def _prompts_of(weights: Path, model_class: str | None = None) -> torch.Tensor:
    prompts = read_tensors(weights).get("prompts")
    if prompts is None or prompts.ndim != 3:
        what = f"a {model_class} adapter" if model_class else "the file"
        raise ValueError(
            f"{weights} holds no (layers, M, D) prompts ({what}): transfer from a prompt method."
        )
    return prompts.float()


def combine_prompts(
    sources: Sequence[torch.Tensor],
    num_prompts: int | None = None,
    layers: int | None = None,
    combine: str = "mean",
) -> torch.Tensor:
    """The ``(layers, num_prompts, D)`` prompts combined from ``sources`` (each ``(layers_s, M_s, D)``)."""
    if not sources:
        raise ValueError("transfer needs at least one source.")
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}.")
    widths = {s.shape[-1] for s in sources}
    if len(widths) > 1:
        raise ValueError(f"The sources' prompts have different widths {sorted(widths)}: different backbones.")
    layers = sources[0].shape[0] if layers is None else layers
    short = [i for i, s in enumerate(sources) if s.shape[0] < layers]
    if short:
        raise ValueError(f"Sources {short} have fewer than {layers} prompted layers: use fewer layers.")
    cut = [s[:layers] for s in sources]
    if combine == "mean":
        m = min(s.shape[1] for s in cut) if num_prompts is None else num_prompts
        if any(s.shape[1] < m for s in cut):
            raise ValueError(
                f"mean needs {m} prompts from every source; they have {[s.shape[1] for s in cut]}."
            )
        return torch.stack([s[:, :m] for s in cut]).mean(dim=0)
    depth = max(s.shape[1] for s in cut)
    order = [s[:, j] for j in range(depth) for s in cut if j < s.shape[1]]  # token j of every source, in turn
    m = len(order) if num_prompts is None else num_prompts
    if m > len(order):
        raise ValueError(f"concat gives {len(order)} prompts per layer, fewer than num_prompts {m}.")
    return torch.stack(order[:m], dim=1)


def transfer_prompts(
    sources: Sequence[str | Path],
    output: str | Path,
    combine: str = "mean",
    num_prompts: int | None = None,
    layers: int | None = None,
    seed: int | None = None,
    stage: str | None = None,
) -> torch.Tensor:
    """Combine the sources' prompts (:func:`combine_prompts`) and save them to ``output``."""
    read = [source_prompts(s, seed, stage) for s in sources]
    signatures = {json.dumps(sig, sort_keys=True) for _, sig in read if sig}
    if len(signatures) > 1:
        raise ValueError(f"The sources were trained on different backbones: {sorted(signatures)}.")
    prompts = combine_prompts([p for p, _ in read], num_prompts, layers, combine)
    metadata = {
        "method": "transfer",
        "combine": combine,
        "sources": [str(s) for s in sources],
        "signature": json.loads(next(iter(signatures))) if signatures else None,
    }
    save_prompts_file(output, prompts, metadata)
    print(f"transferred {combine} of {len(sources)} source(s): prompts {tuple(prompts.shape)} -> {output}")
    return prompts
