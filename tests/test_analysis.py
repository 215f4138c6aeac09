"""selfprompt.analysis: the NMI estimator on cases with known answers, the per-layer statistics, tracking
during training (resumable, training unchanged) and `selfprompt analyze`."""

import itertools
import json
import os
import subprocess
import sys

from selfprompt import PromptedViT
from selfprompt.analysis import block_inputs, default_bins, layer_statistics, pairwise_nmi, quantile_bins
from selfprompt.analysis.statistics import STATISTICS, BlockInput
from selfprompt.cli import main
from selfprompt.engine import run
from selfprompt.init.kmeans import kmeans

import pytest
import torch
from conftest import tiny_vit
from engine_helpers import adapter, cli_args, make_dataset, tiny_config
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_identical_or_monotonically_related_vectors_score_exactly_one():
    a = randn(8, 128)
    assert torch.allclose(pairwise_nmi(a, a).diagonal(), torch.ones(8), atol=1e-5)
    assert torch.allclose(pairwise_nmi(a, a.exp() * 3 + 1).diagonal(), torch.ones(8), atol=1e-5)


def test_the_estimator_is_scikit_learns_nmi_and_ami_on_quantile_bins():
    a, b = randn(3, 96, seed=1), randn(4, 96, seed=2)
    b[1] = a[0] + 0.5 * b[1]  # one related pair
    bins = 6
    labels_a, labels_b = quantile_bins(a, bins), quantile_bins(b, bins)
    assert (torch.bincount(labels_a[0]) == 16).all(), "equal-frequency bins"
    adjusted, plain = pairwise_nmi(a, b, bins), pairwise_nmi(a, b, bins, adjusted=False)
    for i in range(3):
        for j in range(4):
            la, lb = labels_a[i].numpy(), labels_b[j].numpy()
            ami = adjusted_mutual_info_score(la, lb, average_method="geometric")
            nmi = normalized_mutual_info_score(la, lb, average_method="geometric")
            assert adjusted[i, j].item() == pytest.approx(ami, abs=1e-5)
            assert plain[i, j].item() == pytest.approx(nmi, abs=1e-5)


def test_independent_noise_scores_near_zero_where_the_plug_in_estimate_is_biased():
    x, y = randn(4000, 1, 128, seed=3), randn(4000, 1, 128, seed=4)
    scores = pairwise_nmi(x, y)
    assert abs(scores.mean().item()) < 0.003 and scores.std().item() < 0.03
    # the bias the chance adjustment and the default bins remove: 32 bins of 128 coordinates
    assert pairwise_nmi(x, y, bins=32, adjusted=False).mean().item() > 0.5
    assert abs(pairwise_nmi(x, y, bins=32).mean().item()) < 0.01


def test_the_score_falls_monotonically_as_noise_grows():
    x, noise = randn(500, 1, 128, seed=5), randn(500, 1, 128, seed=6)
    scores = [pairwise_nmi(x, x + s * noise).mean().item() for s in (0.0, 0.1, 0.3, 0.6, 1.0, 2.0, 5.0)]
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    assert scores[-1] < 0.05


def test_bins_default_and_bad_input():
    assert [default_bins(d) for d in (8, 32, 128, 768)] == [2, 2, 5, 12]
    with pytest.raises(ValueError, match="bins must be in"):
        pairwise_nmi(randn(2, 16), randn(2, 16), bins=1)
    with pytest.raises(ValueError, match="same vector length"):
        pairwise_nmi(randn(2, 16), randn(2, 8))


def test_block_inputs_are_the_prompts_and_patch_tokens_entering_each_block(images):
    backbone = tiny_vit(reg_tokens=1)
    deep = PromptedViT(backbone, num_classes=3, num_prompts=4, deep=True).train()
    layers = block_inputs(deep, images)
    assert len(layers) == 3 and deep.training, "one per block; the mode is restored"
    assert all(not block._forward_pre_hooks for block in backbone.blocks), "hooks removed"
    for i, layer in enumerate(layers):
        assert layer.prompts.shape == (6, 4, 32) and layer.patches.shape == (6, 64, 32)
        assert torch.equal(layer.prompts, deep.prompts[i].detach().expand(6, -1, -1))
    embedded = backbone._pos_embed(backbone.patch_embed(images))[:, backbone.num_prefix_tokens :]
    torch.testing.assert_close(layers[0].patches, embedded)
    shallow = block_inputs(PromptedViT(tiny_vit(), num_classes=3, num_prompts=4), images)
    assert not torch.allclose(shallow[1].prompts[0], shallow[1].prompts[1]), "shallow prompt states evolve"


def test_inertia_ratio_is_one_for_the_k_means_centres_and_above_for_other_prompts():
    centres = randn(5, 16, seed=7) * 4
    patches = (centres.repeat(40, 1) + randn(200, 16, seed=8))[None]
    fitted = kmeans(patches[0], 5, torch.Generator().manual_seed(0)).centers
    stats = layer_statistics(BlockInput(fitted[None], patches), generator=torch.Generator().manual_seed(0))
    assert set(stats) == set(STATISTICS)
    assert stats["inertia_ratio"] == pytest.approx(1.0, abs=1e-5)
    moved = layer_statistics(BlockInput(fitted[None] + 1.0, patches))
    assert moved["inertia_ratio"] > 1.1
    assert stats["prompt_norm"] == pytest.approx(fitted.norm(dim=1).mean().item(), rel=1e-5)
    assert stats["patch_norm"] == pytest.approx(patches.norm(dim=-1).mean().item(), rel=1e-5)
    scaled = layer_statistics(BlockInput(fitted[None], fitted[None].repeat(1, 3, 1) * 2.0))
    assert scaled["nearest_cosine"] == pytest.approx(1.0, abs=1e-5)


def analysis_rows(run_dir, stage="tune", timings=False):
    lines = (run_dir / "seed0" / stage / "analysis.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return rows if timings else [{k: v for k, v in r.items() if k != "analysis_time"} for r in rows]


def test_tracking_records_every_layer_leaves_training_unchanged_and_analyze_plots_it(data, tmp_path):
    common = {"stage": "tune", "optim.epochs": 2, "prompt.dropout": 0.1}
    run(tiny_config(data, tmp_path / "plain", **common), log=lambda _: None)
    for method in ("vpt-deep", "spt-deep"):
        cfg = tiny_config(data, tmp_path / method, method, **common, **{"track.every": 1})
        run(cfg, log=lambda _: None)
    rows = analysis_rows(tmp_path / "spt-deep", timings=True)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    expected = {"epoch", "analysis_time"} | {f"{s}/layer{i}" for s in STATISTICS for i in (0, 1)}
    assert all(set(r) == expected for r in rows)
    stage = tmp_path / "spt-deep" / "seed0" / "tune"
    assert sorted(p.name for p in stage.glob("projection_*")) == [
        "projection_epoch0.safetensors",
        "projection_epoch2.safetensors",
    ]
    for key, value in adapter(tmp_path / "plain", "tune").items():
        assert torch.equal(adapter(tmp_path / "spt-deep", "tune")[key], value), key

    output = tmp_path / "plots"
    assert (
        main(["analyze", str(tmp_path / "vpt-deep"), str(tmp_path / "spt-deep"), "--output", str(output)])
        == 0
    )
    names = ["inertia_ratio", "nearest_cosine", "nmi_max", "nmi_mean", "norms", "projection"]
    assert sorted(p.stem for p in output.iterdir()) == names
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in output.iterdir())


def test_a_resumed_run_keeps_its_tracked_history(data, tmp_path):
    settings = {"stage": "tune", "track.every": 1}
    run(tiny_config(data, tmp_path / "whole", **settings), log=lambda _: None)

    class Stop(Exception):
        pass

    def stop_at_epoch_two(message: str) -> None:
        if "epoch 2/3" in message:
            raise Stop

    with pytest.raises(Stop):
        run(tiny_config(data, tmp_path / "cut", **settings), log=stop_at_epoch_two)
    assert [r["epoch"] for r in analysis_rows(tmp_path / "cut")] == [0, 1]
    run(tiny_config(data, tmp_path / "cut", **settings, resume=True), log=lambda _: None)
    assert analysis_rows(tmp_path / "cut") == analysis_rows(tmp_path / "whole")


@pytest.mark.slow
def test_tracking_under_two_processes_records_on_the_main_one(data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*cli_args(data, tmp_path), "--stage", "tune", "--optim.epochs", "2", "--track.every", "1"]
    done = subprocess.run(
        [*torchrun, "-m", "selfprompt", "train", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in analysis_rows(tmp_path)] == [0, 1, 2]


def test_bad_tracking_settings_and_untracked_runs_are_refused(data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"track\.every needs prompts"):
        run(tiny_config(data, tmp_path / "linear", "linear", **{"track.every": 1}), log=lambda _: None)
    run(tiny_config(data, tmp_path / "untracked", **{"stage": "tune", "optim.epochs": 1}), log=lambda _: None)
    assert main(["analyze", str(tmp_path / "untracked")]) == 1
    assert "--track.every" in capsys.readouterr().err
