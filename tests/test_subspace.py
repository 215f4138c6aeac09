"""SubPT's gradient-subspace projection: what it projects onto, that rank D changes nothing, and its state."""

import io

from selfprompt.engine import run
from selfprompt.engine.subspace import GradientSubspace

import pytest
import torch
from engine_helpers import adapter, make_dataset, tiny_config
from torch import nn


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _grads(steps: int, layers: int = 2, m: int = 4, dim: int = 16, span: int = 3, seed: int = 0):
    """Gradients whose rows lie in a ``span``-dimensional subspace of R^dim (a different one per layer)."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(layers, dim, span, generator=g, dtype=torch.float64))[0].float()
    return [torch.randn(layers, m, span, generator=g) @ bases.transpose(1, 2) for _ in range(steps)], bases


def _feed(subspace: GradientSubspace, grads) -> None:
    for grad in grads:
        subspace.prompts.grad = grad.clone()
        subspace.step()


def test_projected_gradients_lie_in_the_span_of_the_early_gradients():
    early, bases = _grads(5)
    prompts = nn.Parameter(torch.zeros(2, 4, 16))
    subspace = GradientSubspace(prompts, rank=3, steps=5)
    _feed(subspace, early)
    assert subspace.basis.shape == (2, 16, 3)
    # the basis spans each layer's early gradients: projecting them changes nothing
    for grad in early:
        torch.testing.assert_close(subspace.project(grad), grad, atol=1e-5, rtol=0)
    # a later gradient is replaced by its projection, and what is left out is orthogonal to the subspace
    later = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(9))
    prompts.grad = later.clone()
    subspace.step()
    projected = prompts.grad
    assert (
        projected.transpose(1, 2) - bases @ (bases.transpose(1, 2) @ projected.transpose(1, 2))
    ).abs().max() < 1e-5
    residual = later - projected
    assert (residual @ subspace.basis).abs().max() < 1e-5
    assert residual.norm() > 0.5 * later.norm()  # 3 of 16 directions kept: most of a random gradient goes


def test_full_rank_projection_is_the_identity():
    prompts = nn.Parameter(torch.zeros(2, 4, 16))
    subspace = GradientSubspace(prompts, rank=16, steps=8)
    _feed(subspace, [torch.randn(2, 4, 16) for _ in range(8)])
    grad = torch.randn(2, 4, 16)
    torch.testing.assert_close(subspace.project(grad), grad, atol=1e-5, rtol=0)


def test_state_round_trip_mid_recording_gives_the_same_basis():
    grads, _ = _grads(6, span=5)
    whole = GradientSubspace(nn.Parameter(torch.zeros(2, 4, 16)), rank=2, steps=6)
    _feed(whole, grads)
    first = GradientSubspace(nn.Parameter(torch.zeros(2, 4, 16)), rank=2, steps=6)
    _feed(first, grads[:3])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = GradientSubspace(nn.Parameter(torch.zeros(2, 4, 16)), rank=2, steps=6)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert resumed.basis is None and resumed.seen == 3
    _feed(resumed, grads[3:])
    assert torch.equal(resumed.basis, whole.basis)


def test_rank_d_trains_like_no_projection_and_a_low_rank_does_not(data, tmp_path):
    def quiet(_):
        pass

    settings = {"stage": "tune", "optim.subspace_steps": 3}
    run(tiny_config(data, tmp_path / "plain", stage="tune"), log=quiet)
    run(tiny_config(data, tmp_path / "full", **settings, **{"optim.subspace_rank": 32}), log=quiet)
    run(tiny_config(data, tmp_path / "low", **settings, **{"optim.subspace_rank": 2}), log=quiet)
    plain = adapter(tmp_path / "plain", "tune")
    for key, value in adapter(tmp_path / "full", "tune").items():
        torch.testing.assert_close(value, plain[key], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapter(tmp_path / "low", "tune")["prompts"], plain["prompts"], atol=1e-3)
    state = torch.load(tmp_path / "low" / "seed0" / "tune" / "state.pt", weights_only=False)
    assert state["subspace"]["seen"] == 3 and state["subspace"]["basis"].shape == (2, 32, 2)


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("linear", {"optim.subspace_rank": 2}, "has no prompts"),
        ("spt-deep", {"optim.subspace_rank": 33}, r"must be in 1\.\.32"),
    ],
)
def test_bad_subspace_settings_are_refused(data, tmp_path, method, settings, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_config(data, tmp_path, method, stage="tune", **settings), log=lambda _: None)
