"""``selfprompt pretrain``: MAE or supervised pretraining of a timm ViT, on the engine's epoch loop.

Writes into ``output_dir``: ``config.yaml``, ``env.json``, ``metrics.{jsonl,csv}``, ``state.pt`` (every
epoch, for ``--resume``), and at the end ``encoder.safetensors`` (the backbone without a head, fp32) and
``summary.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from selfprompt.atomic import atomic_write
from selfprompt.data import build_transform, data_config
from selfprompt.engine.distributed import Context, setup, teardown
from selfprompt.engine.lifecycle import claimed_run_dir, prepare_run_dir, run_environment
from selfprompt.engine.loop import LossFn, check_batch, evaluate
from selfprompt.engine.rundir import RunDir
from selfprompt.engine.setup import TrainingOptions, training_setup
from selfprompt.pretrain.config import PretrainConfig, check_pretrain_config
from selfprompt.pretrain.data import pretrain_datasets
from selfprompt.pretrain.mae import MaskedAutoencoder

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

_UNDECAYED_TOKENS = ("pos_embed", "cls_token", "reg_token", "mask_token")


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: biases, norms and position/class/register/mask tokens are not decayed (the MAE
    recipe); every other weight decays by ``weight_decay``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        undecayed = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _UNDECAYED_TOKENS
        (no_decay if undecayed else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mae_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return net(images)[0].float()


def _encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, MaskedAutoencoder):
        return model.encoder_state_dict()
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def build_pretraining(cfg: PretrainConfig) -> tuple[nn.Module, nn.Module, LossFn]:
    """``(model that trains, its encoder, loss)``; the weights are random under ``cfg.seed``."""
    if not timm.is_model(cfg.backbone):
        raise ValueError(f"Unknown backbone {cfg.backbone!r} (timm {timm.__version__}).")
    torch.manual_seed(cfg.seed)
    encoder = timm.create_model(
        cfg.backbone, pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path, **cfg.backbone_kwargs
    )
    if cfg.objective == "mae":
        mae = cfg.mae
        model = MaskedAutoencoder(
            encoder, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads, mae.mask_ratio, mae.norm_pix_loss
        )
        return model, encoder, _mae_loss

    def supervised_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(images).float(), labels, label_smoothing=cfg.label_smoothing)

    return encoder, encoder, supervised_loss


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (single process, or one rank under torchrun) and return its summary."""
    check_pretrain_config(cfg)
    ctx = setup(cfg.device)
    say = log if ctx.is_main else (lambda _: None)
    try:
        model, encoder, compute_loss = build_pretraining(cfg)
        pre = data_config(encoder)
        train_tf = build_transform(pre, train=True, augment="crop-flip", min_scale=cfg.data.min_scale)
        train, evaluation = pretrain_datasets(cfg.data, train_tf, build_transform(pre, train=False))
        if cfg.objective == "supervised":
            encoder.reset_classifier(len(train.classes))
        else:
            evaluation = None  # MAE reports its reconstruction loss only
        data, accumulate = cfg.data, cfg.optim.accumulate
        check_batch(len(train), data.batch_size, accumulate, ctx.world_size, "The pretraining set")
        with claimed_run_dir(cfg, ctx):
            run = prepare_run_dir(cfg, ctx, say)
            if ctx.is_main:
                fingerprint = {"data_fingerprint": train.fingerprint(), "images": len(train)}
                run.write_env(run_environment(ctx, cfg) | fingerprint)
            return _train(cfg, ctx, model.to(ctx.device), encoder, compute_loss, train, evaluation, run, say)
    finally:
        teardown()


def _train(
    cfg: PretrainConfig,
    ctx: Context,
    model: nn.Module,
    encoder: nn.Module,
    compute_loss: LossFn,
    train: Any,
    evaluation: Any,
    run: RunDir,
    say: Callable[[str], None],
) -> dict[str, Any]:
    if cfg.resume and run.summary.is_file():
        say(f"[pretrain] already finished: {run.summary}")
        return run.read_summary()
    opt, data = cfg.optim, cfg.data
    setup = training_setup(
        dict(model.named_parameters()), pretrain_param_groups(model, opt.weight_decay), train,
        TrainingOptions.of(opt, data, cfg), ctx, cfg.seed, run, label="pretrain", log=say,
        what="The pretraining set",
    )  # fmt: skip

    def evaluate_epoch(epoch: int) -> dict[str, Any]:
        if evaluation is None or not (epoch % cfg.eval_every == 0 or epoch == opt.epochs):
            return {}
        scores = evaluate(model, evaluation, ctx, data.eval_batch_size, cfg.precision, data.num_workers)
        return {f"eval_{k}": v for k, v in scores.items()}

    setup.loop(model, compute_loss).run(setup.start_epoch, opt.epochs, evaluate_epoch, setup.save)
    if not ctx.is_main:
        return {}
    weights = {k: v.detach().cpu().contiguous() for k, v in _encoder_state(model).items()}
    atomic_write(run.encoder, lambda p: save_file(weights, str(p)))
    rows = setup.metrics.rows
    summary = {
        "objective": cfg.objective,
        "backbone": cfg.backbone,
        "epochs": opt.epochs,
        "images": len(train),
        "final_train_loss": rows[-1]["train_loss"],
        "wall_time_s": sum(r["epoch_time"] for r in rows),
        "encoder_sha256": hashlib.sha256(run.encoder.read_bytes()).hexdigest(),
        "encoder_parameters": sum(v.numel() for v in weights.values()),
    }
    if "eval_acc" in rows[-1]:
        summary["final_eval_acc"] = rows[-1]["eval_acc"]
    run.write_summary(summary)
    setup.metrics.close()
    say(
        f"[pretrain] {cfg.objective} {cfg.backbone}: final loss {summary['final_train_loss']:.4f} after "
        f"{opt.epochs} epochs, {summary['wall_time_s']:.0f} s; encoder weights {run.encoder}"
    )
    return summary
