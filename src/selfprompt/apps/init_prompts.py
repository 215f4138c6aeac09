"""``selfprompt init-prompts``: a recipe's initial prompts, computed once, cached in a file and shown."""

from __future__ import annotations

from pathlib import Path

from selfprompt.adapter import read_tensors
from selfprompt.config import TrainConfig
from selfprompt.data.splits import build_splits, eval_transform
from selfprompt.engine.build import backbone_name, build_model, create_backbone, method_settings
from selfprompt.init import init_prompts
from selfprompt.methods import get_method, method_names
from selfprompt.methods.prompt import initializer_options, prompts_file_metadata, save_prompts_file

import torch


def init_prompts_command(cfg: TrainConfig, output: str, seed: int) -> torch.Tensor:
    """Compute the recipe's initial prompts on its training images, save them and print their statistics.

    An existing file computed with the same settings and data is reused (the cache); train with
    ``--prompt.file`` to start from it.
    """
    method, settings = method_settings(cfg)
    if not method.has_prompts:
        with_prompts = [name for name in method_names() if get_method(name).has_prompts]
        raise ValueError(
            f"method {method.name!r} has no prompts; use one that has: {', '.join(with_prompts)}."
        )
    backbone = create_backbone(cfg.model)
    splits = build_splits(cfg.data, backbone)
    model = build_model(cfg, backbone, len(splits.classes))
    key = {
        "backbone": backbone_name(backbone),
        "method": method.initializer(settings.init),
        "shape": list(model.prompts.shape),
        "seed": seed,
        "fraction": settings.init_fraction,
        "max_images": settings.init_max_images,
        "data": splits.train.fingerprint(),
        "preprocessing": repr(eval_transform(cfg.data, backbone)),
    }
    options = initializer_options(settings)
    if options:  # only then: a file cached before initializers had options keeps its key
        key["options"] = options
    out = Path(output)
    cached = out.is_file() and prompts_file_metadata(out) == key
    if cached:
        prompts = read_tensors(out)["prompts"]
    else:
        loader = torch.utils.data.DataLoader(splits.init_train, batch_size=cfg.data.eval_batch_size)
        prompts = init_prompts(
            model,
            loader,
            key["method"],
            fraction=settings.init_fraction,
            max_images=key["max_images"],
            seed=seed,
            options=options,
        ).cpu()
        save_prompts_file(out, prompts, key)
    print(
        f"{'reused cached' if cached else 'computed'} {key['method']} prompts {tuple(prompts.shape)} -> {out}"
    )
    print(f"{'layer':>5s} {'mean norm':>10s} {'mean pairwise cosine':>21s}")
    for layer, p in enumerate(prompts.float()):
        cos = torch.nn.functional.normalize(p, dim=1) @ torch.nn.functional.normalize(p, dim=1).T
        off_diagonal = (cos.sum() - cos.diagonal().sum()) / max(1, len(p) * (len(p) - 1))
        print(f"{layer:5d} {p.norm(dim=1).mean():10.3f} {off_diagonal:21.3f}")
    return prompts
