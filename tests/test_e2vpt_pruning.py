"""E2VPT's pruning and rewind (METHODS.md section 6c): strided segment masks shared by every layer, mask
scores as the gradient of an explicit mask, nested pruning shares, and prune -> rewind end to end."""

import json

from selfprompt.apps.sweep import SweepSettings, sweep
from selfprompt.cli import main
from selfprompt.engine.build import method_settings
from selfprompt.engine.run import run
from selfprompt.engine.trained import load_run_model
from selfprompt.methods.e2vpt import model as e2vpt
from selfprompt.methods.e2vpt.model import E2VPT, SEGMENTS, mask_importance, pruning_masks, read_pruning

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import adapter, make_dataset, tiny_config
from prompt_method_checks import check_round_trip


def masks(tokens: list[int], pruned_segments: dict[int, list[int]], n: int = 3):
    segment_mask = [[0 if s in pruned_segments.get(j, []) else 1 for s in range(SEGMENTS)] for j in range(n)]
    return {"token_mask": tokens, "segment_mask": segment_mask}


def trained(**kwargs) -> E2VPT:
    model = E2VPT(tiny_vit(reg_tokens=1), num_classes=5, num_prompts=3, kv_length=2, **kwargs).eval()
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    return model


def test_masks_zero_whole_tokens_and_strided_segments_in_every_layer(images):
    """Token 1 pruned and segment 3 of token 0 (dims 3 and 19 of 32): the same as an unmasked model whose
    prompts are zero there, at every layer; pruned values get no gradient and do not count as trained."""
    plain, pruned = trained(), trained(**masks([1, 0, 1], {0: [3]}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same values through the same ops: bitwise equal on one thread
    try:
        with torch.no_grad():
            pruned.prompts.copy_(plain.prompts)
            plain.prompts[:, 1] = 0
            plain.prompts[:, 0, 3] = plain.prompts[:, 0, 19] = 0
            assert torch.equal(pruned(images), plain(images))
    finally:
        torch.set_num_threads(threads)
    torch.nn.functional.cross_entropy(pruned(images), torch.arange(len(images)) % 5).backward()
    grad = pruned.prompts.grad
    assert grad[:, 1].abs().sum() == 0 and grad[:, 0, [3, 19]].abs().sum() == 0
    assert (grad[:, 0, [2, 4, 18, 20]] != 0).all() and (grad[:, 2] != 0).all()
    layers = pruned.prompts.shape[0]
    assert plain.num_adapter_parameters() - pruned.num_adapter_parameters() == layers * (32 + 2)


def test_round_trip_keeps_the_masks(images, tmp_path):
    model = E2VPT(tiny_vit(), 5, num_prompts=3, kv_length=2, **masks([1, 1, 0], {2: [0, 5]}))
    reloaded = check_round_trip(model, images, tmp_path)
    assert reloaded.config.token_mask == [1, 1, 0] and torch.equal(reloaded.prompt_mask, model.prompt_mask)


@pytest.mark.parametrize(
    "bad",
    [
        {"token_mask": [0, 0, 0], "segment_mask": [[1] * 16] * 3},
        {"token_mask": [1, 1], "segment_mask": [[1] * 16] * 3},
        {"token_mask": [1, 1, 1], "segment_mask": [[1] * 8] * 3},
        {"token_mask": [1, 2, 1], "segment_mask": [[1] * 16] * 3},
    ],
)
def test_bad_masks_are_refused(bad):
    with pytest.raises(ValueError, match="token_mask and segment_mask must be 0/1 lists"):
        E2VPT(tiny_vit(), 5, num_prompts=3, **bad)


def test_scores_are_the_gradient_of_an_explicit_shared_mask(images):
    """Token score j = sum over batches |dL/dm_j| with prompts m_j * P[l, j] in every layer l; segment score
    (j, s) the same with a mask on dims d = s mod 16 of token j."""
    model = trained()
    labels = torch.arange(len(images)) % 5
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    prompts = model.prompts.detach()
    dims = torch.arange(32) % SEGMENTS
    tokens, segments = torch.zeros(3, dtype=torch.float64), torch.zeros(3, SEGMENTS, dtype=torch.float64)
    for x, y in batches:
        m_token = torch.ones(3, requires_grad=True)
        m_segment = torch.ones(3, SEGMENTS, requires_grad=True)
        masked = prompts * m_token[None, :, None] * m_segment[:, dims][None]
        logits = torch.func.functional_call(model, {"prompts": masked}, (x,))
        g_token, g_segment = torch.autograd.grad(
            torch.nn.functional.cross_entropy(logits, y), [m_token, m_segment]
        )
        tokens += g_token.abs().double()
        segments += g_segment.abs().double()
    got_tokens, got_segments = mask_importance(model, batches)
    torch.testing.assert_close(got_tokens, tokens)
    torch.testing.assert_close(got_segments, segments)
    assert not model.training


def test_pruning_shares_floor_nest_and_keep_their_minimums():
    tokens = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 0.5, 7.0, 2.0, 8.0, 6.0])
    segments = torch.arange(10 * SEGMENTS, dtype=torch.float64).view(10, SEGMENTS).flip(-1)
    kept, seg = pruning_masks(tokens, segments, 0.3, 0.5)
    assert kept == [1, 0, 1, 0, 1, 0, 1, 1, 1, 1]  # floor(0.3 * 10) = 3 lowest: 0.5, then the tied 1.0s
    assert all(row == [1] * 8 + [0] * 8 for row in seg)  # floor(0.5 * 16) = 8 lowest of each token
    assert pruning_masks(tokens, segments, 0.25, 0.0)[0] == [
        1,
        1,
        1,
        0,
        1,
        0,
        1,
        1,
        1,
        1,
    ]  # ties: later first
    assert sum(pruning_masks(tokens, segments, 0.99, 0.0)[0]) == 1  # one token always survives
    assert all(sum(row) == 4 for row in pruning_masks(tokens, segments, 0.0, 0.9)[1])  # 4 of 16 survive
    previous = set(range(10))
    for share in (0.1, 0.3, 0.5, 0.7, 0.9):  # the official cascade: each share prunes a superset
        now = {j for j, k in enumerate(pruning_masks(tokens, segments, share, 0.0)[0]) if k}
        assert now <= previous
        previous = now
    with pytest.raises(ValueError, match=r"prune_tokens must be the share pruned, in \[0, 1\)"):
        pruning_masks(tokens, segments, 1.0, 0.0)


def test_the_pruning_record_is_read_once_per_run(tmp_path, monkeypatch):
    """The method and its settings are resolved once per run: 2 seeds x 2 stages read the record once."""
    scores = tmp_path / "pruning.json"
    scores.write_text(
        json.dumps({"stage": "tune", "num_prompts": 4, "token_scores": [4.0, 3.0, 2.0, 1.0],
                    "segment_scores": [[float(s) for s in range(SEGMENTS)]] * 4})
    )  # fmt: skip
    reads = []

    def counted(path):
        reads.append(path)
        return read_pruning(path)

    monkeypatch.setattr(e2vpt, "read_pruning", counted)
    shares = {"e2vpt.pruning": str(scores), "e2vpt.prune_tokens": 0.5, "seeds": [0, 1], "optim.epochs": 1}
    run(tiny_config(make_dataset(tmp_path / "data"), tmp_path / "run", method="e2vpt", **shares))
    assert reads == [str(scores)]
    assert all((tmp_path / "run" / f"seed{seed}" / stage / "result.json").is_file()
               for seed in (0, 1) for stage in ("tune", "final"))  # fmt: skip


def test_prune_then_rewind_end_to_end(tmp_path, capsys):
    """e2vpt (both stages) -> selfprompt prune --stage tune -> a sweep of rewound e2vpt runs over the token
    share, chosen on val: they start from the source's initial values, count only the kept values and
    reload with their masks; bad combinations get messages."""
    data = make_dataset(tmp_path / "data")
    source = tmp_path / "e2vpt"
    source_summary = run(tiny_config(data, source, method="e2vpt"))
    scores = tmp_path / "scores" / "pruning.json"  # its folder is made
    assert main(["prune", str(source), "--stage", "tune", "--output", str(scores)]) == 0
    record = json.loads(scores.read_text())
    assert record["stage"] == "tune" and record["num_prompts"] == 4 and len(record["segment_scores"]) == 4
    assert main(["prune", str(source), "--stage", "tune", "--output", str(scores)]) == 0
    assert "reused" in capsys.readouterr().out

    shares = {"e2vpt.pruning": str(scores), "e2vpt.prune_tokens": 0.5, "e2vpt.prune_segments": 0.25}
    rewound_cfg = tiny_config(data, tmp_path / "rewound", method="e2vpt", **shares)
    plain_cfg = tiny_config(data, tmp_path / "unused", method="e2vpt")
    models = []
    for cfg in (rewound_cfg, plain_cfg):  # the same seed draws the same initial values, masks or not
        method, settings = method_settings(cfg)
        model = method.build(tiny_vit(), 3, settings, pool=None, head_init_std=0.02, backbone_name=None)
        method.prepare(method, model, settings, None, 0)
        models.append(model)
    assert torch.equal(models[0].prompts, models[1].prompts)

    search = SweepSettings({"e2vpt.prune_tokens": [0.5, 0.75]})  # the shares chosen on val
    chosen = sweep(rewound_cfg, search, log=lambda _: None)["best"]["params"]["e2vpt.prune_tokens"]
    tokens, segments = pruning_masks(
        torch.tensor(record["token_scores"]), torch.tensor(record["segment_scores"]), chosen, 0.25
    )
    assert sum(tokens) == 4 - int(chosen * 4) and all(sum(row) == 12 for row in segments)
    _, reloaded, _ = load_run_model(tmp_path / "rewound" / "final", None, "final", "cpu")
    assert reloaded.config.token_mask == tokens and reloaded.config.segment_mask == segments
    summary = json.loads((tmp_path / "rewound" / "final" / "summary.json").read_text())
    pruned_values = (4 * 32 - sum(tokens) * 12 * 2) * 2  # 2 layers; 12 of 16 segments of 2 dims each
    assert (
        source_summary["trainable_parameters"] - summary["results"][0]["trainable_parameters"]
        == pruned_values
    )
    assert adapter(tmp_path / "rewound" / "final")["prompts"].shape == (2, 4, 32)  # full tensor, masks beside

    final_scores = tmp_path / "final.json"
    assert main(["prune", str(source), "--output", str(final_scores)]) == 0
    with pytest.raises(ValueError, match=r"scored from a model trained on train\+val, so a tune stage"):
        run(
            tiny_config(
                data, tmp_path / "x", method="e2vpt", **{**shares, "e2vpt.pruning": str(final_scores)}
            )
        )
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"stage": "tune"}')
    with pytest.raises(ValueError, match=r"is not a pruning record .* selfprompt prune RUN --output FILE"):
        run(tiny_config(data, tmp_path / "w", method="e2vpt", **{**shares, "e2vpt.pruning": str(damaged)}))
    with pytest.raises(ValueError, match=r"set prompt\.num_prompts 4"):
        run(tiny_config(data, tmp_path / "y", method="e2vpt", **{**shares, "prompt.num_prompts": 3}))
    assert main(["train", "--model.method", "e2vpt", "--e2vpt.prune_tokens", "0.5", "--data.root", "x"]) == 1
    linear = tmp_path / "linear"
    run(tiny_config(data, linear, method="linear"))
    assert main(["prune", str(linear), "--output", str(tmp_path / "z.json")]) == 1
    err = capsys.readouterr().err
    assert "prune_tokens and prune_segments need pruning" in err and "prune an e2vpt run" in err
