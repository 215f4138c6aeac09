"""Prompt initializers: token sources, shapes, seeding, sampling without replacement, pooling, k-means."""

import selfprompt as sp
from selfprompt.init.kmeans import kmeans
from selfprompt.init.methods import pooling_grid
from selfprompt.init.reservoir import Reservoir

import pytest
import torch
from conftest import tiny_vit
from torch.utils.data import DataLoader, Dataset

METHODS = ["xavier", "sample", "mean_pool", "max_pool", "kmeans", "vipamin"]


class RecordingImages(Dataset):
    """Generated images; remembers which indices were read."""

    def __init__(self, n: int = 24, seed: int = 0):
        self.images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        self.read: list[int] = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.read.append(i)
        return self.images[i], i % 3


def loader(dataset=None, **kwargs) -> DataLoader:
    return DataLoader(RecordingImages() if dataset is None else dataset, batch_size=5, **kwargs)


def layer_tokens(backbone, images) -> list[torch.Tensor]:
    """Each layer's patch tokens from timm's own API: patch embedding, then block outputs minus prefix."""
    with torch.no_grad():
        first = backbone.patch_embed(images)
        blocks = backbone.forward_intermediates(images, norm=False, intermediates_only=True, output_fmt="NLC")
    return [first, *blocks]


def test_registry_lists_builtins():
    assert sp.available_initializers() == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("deep, deep_layers", [(False, None), (True, None), (True, 2)])
def test_shapes_and_seeding(method, deep, deep_layers):
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=deep, deep_layers=deep_layers)
    first = sp.init_prompts(model, loader(), method, fraction=0.5, seed=0)
    assert first.shape == (deep_layers or 3 if deep else 1, 4, 32)
    assert torch.equal(model.prompts.detach(), first)
    assert torch.isfinite(first).all()
    assert torch.equal(sp.init_prompts(model, loader(), method, fraction=0.5, seed=0), first)
    assert not torch.allclose(sp.init_prompts(model, loader(), method, fraction=0.5, seed=1), first)


@pytest.mark.parametrize("deep", [False, True])
def test_sample_draws_distinct_tokens_of_each_layers_source(deep):
    data = RecordingImages()
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=6, deep=deep)
    prompts = sp.init_prompts(model, loader(data), "sample", seed=3)
    sources = layer_tokens(model.backbone, data.images)
    for layer, rows in enumerate(prompts):
        pool = sources[layer].reshape(-1, 32)
        matches = (rows[:, None, :] == pool[None]).all(-1)
        assert (matches.sum(1) >= 1).all(), f"layer {layer}: a prompt is not a patch token of that layer"
        assert len({int(m.nonzero()[0]) for m in matches}) == len(rows), "tokens drawn twice"


def test_subset_is_drawn_without_replacement_and_ignores_loader_order():
    data = RecordingImages(n=20)
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=True)
    first = sp.init_prompts(model, loader(data), "sample", fraction=0.5, seed=0)
    assert len(data.read) == 10 and len(set(data.read)) == 10
    data.read.clear()
    assert torch.equal(sp.init_prompts(model, loader(data, shuffle=True), "sample", fraction=0.5), first)
    data.read.clear()
    sp.init_prompts(model, loader(data), "sample", fraction=0.5, max_images=3)
    assert len(data.read) == 3


def test_plain_iterables_of_batches_are_accepted():
    images = torch.randn(12, 3, 32, 32)
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=2)
    batches = [{"pixel_values": images[i : i + 4]} for i in range(0, 12, 4)]
    sp.init_prompts(model, batches, "sample", max_images=6)
    sp.init_prompts(model, [images[:4], images[4:]], "kmeans")
    with pytest.raises(ValueError, match="fraction needs a DataLoader"):
        sp.init_prompts(model, batches, "sample", fraction=0.5)


def window_stats(tokens: torch.Tensor, reduce) -> torch.Tensor:
    """The four 4x4 quadrants of each image's 8x8 token grid, reduced: (images * 4, D)."""
    grid = tokens.reshape(len(tokens), 2, 4, 2, 4, -1)
    return reduce(grid, (2, 4)).reshape(-1, tokens.shape[-1])


@pytest.mark.parametrize(
    "method, reduce",
    [("mean_pool", lambda t, d: t.mean(d)), ("max_pool", lambda t, d: t.amax(d))],
)
def test_pooling_uses_2d_windows(method, reduce):
    data = RecordingImages(n=8)
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=True)
    prompts = sp.init_prompts(model, loader(data), method)
    for layer, rows in enumerate(prompts):
        tokens = layer_tokens(model.backbone, data.images)[layer]
        candidates = window_stats(tokens, reduce)
        distances = (
            torch.cdist(rows, candidates, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        )
        assert (distances < 1e-4).all(), f"layer {layer}: prompts are not 2-D window statistics"


def test_pooling_edge_cases():
    assert pooling_grid(20, 14, 14) == (4, 5)
    assert pooling_grid(7, 14, 14) in {(1, 7), (7, 1)}
    assert pooling_grid(1, 14, 14) == (1, 1)
    data = RecordingImages(n=4)
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=1)
    prompt = sp.init_prompts(model, loader(data), "mean_pool")[0, 0]
    image_means = model.backbone.patch_embed(data.images).detach().mean(dim=1)
    assert torch.cdist(prompt[None], image_means).min() < 1e-5, "M=1 must be one image's global mean"
    many = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=100)  # more windows than the 64 tokens
    assert torch.isfinite(sp.init_prompts(many, loader(data), "mean_pool")).all()


def test_reservoir_is_bounded_and_uniform():
    counts = torch.zeros(40)
    for seed in range(2000):
        reservoir = Reservoir(5, torch.Generator().manual_seed(seed))
        for start in range(0, 40, 7):
            reservoir.add(torch.arange(start, min(start + 7, 40), dtype=torch.float32)[:, None])
            assert len(reservoir.rows) <= 5
        picked = reservoir.rows[:, 0].long()
        assert len(picked.unique()) == 5
        counts[picked] += 1
    expected = 2000 * 5 / 40
    assert ((counts - expected).abs() < 5 * expected**0.5).all()


def test_kmeans_matches_scikit_learn_inertia():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=True)
    data = RecordingImages(n=24)
    points = [t.reshape(-1, 32) for t in layer_tokens(model.backbone, data.images)]
    for x in points:
        ours = kmeans(x, 10, torch.Generator().manual_seed(0))
        reference = sklearn_cluster.KMeans(n_clusters=10, n_init=1, random_state=0).fit(x.double().numpy())
        assert ours.inertia <= 1.01 * reference.inertia_, (ours.inertia, reference.inertia_)


def test_kmeans_stops_early_on_tokens_without_clusters_within_1_percent_of_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    ours = kmeans(x, 10, torch.Generator().manual_seed(0))
    reference = sklearn_cluster.KMeans(n_clusters=10, n_init=1, random_state=0).fit(x.double().numpy())
    assert ours.iterations < 100
    assert ours.inertia <= 1.01 * reference.inertia_, (ours.inertia, reference.inertia_)


def test_kmeans_survives_duplicate_points_and_empty_clusters():
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0]]).repeat(30, 1)
    result = kmeans(x, 4, torch.Generator().manual_seed(0))
    assert torch.isfinite(result.centers).all()
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_kmeans_initializer_returns_centres_of_the_tokens():
    data = RecordingImages(n=12)
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=3)
    prompts = sp.init_prompts(model, loader(data), "kmeans", max_tokens=10_000)
    x = model.backbone.patch_embed(data.images).detach().reshape(-1, 32)
    expected = kmeans(x, 3, torch.Generator().manual_seed(1)).inertia
    labels = torch.cdist(x, prompts[0]).argmin(1)
    centres_are_means = torch.stack([x[labels == j].mean(0) for j in range(3)])
    torch.testing.assert_close(centres_are_means, prompts[0], rtol=1e-3, atol=1e-3)
    assert torch.cdist(x, prompts[0]).min(1).values.pow(2).sum() <= 1.02 * expected


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="kmeans", fraction=0.0), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(method="sample", fraction=1.5), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(method="sample", max_images=0), ValueError, "max_images"),
        (dict(method="spt"), ValueError, "known: kmeans, max_pool, mean_pool, sample, vipamin, xavier"),
        (dict(method="kmeans", max_tokens=2), ValueError, "max_tokens"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4)
    with pytest.raises(error, match=message):
        sp.init_prompts(model, loader(), **kwargs)


def test_empty_or_missing_data():
    model = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4)
    with pytest.raises(ValueError, match="yielded no images"):
        sp.init_prompts(model, loader(RecordingImages(n=0)), "sample")
    with pytest.raises(ValueError, match="pass a loader"):
        sp.init_prompts(model, None, "kmeans")
    with pytest.raises(ValueError, match="Only 64 patch tokens were collected for 65 prompts"):
        sp.init_prompts(
            sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=65), [torch.randn(1, 3, 32, 32)]
        )
    with pytest.raises(TypeError, match="Cannot find images"):
        sp.init_prompts(model, [["not", "images"]], "sample")
    sp.init_prompts(model, None, "xavier")  # needs no data
    assert model.prompts.abs().max() <= model.xavier_bound()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_same_prompts_on_cuda(method):
    cpu = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=True)
    gpu = sp.PromptedViT(tiny_vit(), num_classes=3, num_prompts=4, deep=True).cuda()
    expected = sp.init_prompts(cpu, loader(), method)
    torch.testing.assert_close(sp.init_prompts(gpu, loader(), method).cpu(), expected, rtol=1e-3, atol=1e-3)
