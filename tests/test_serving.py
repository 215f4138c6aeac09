"""MultiTaskViT: each row of a mixed-task batch computes what its own task's model computes."""

import threading

from selfprompt.methods import load_pretrained
from selfprompt.methods.apt import APT
from selfprompt.methods.bitfit import BitFit
from selfprompt.methods.prompt import PromptedViT
from selfprompt.model import ViTClassifier
from selfprompt.serving import MultiTaskViT
from selfprompt.serving.packed import packable, packed_block

import pytest
import torch
from conftest import tiny_vit

TOL = 1e-5


def _randomize_head(model: ViTClassifier, seed: int) -> ViTClassifier:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.5)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g))
    return model


def _make_adapters(root, backbone_kwargs):
    """Adapters of every kind on the same tiny backbone: name -> folder."""
    torch.manual_seed(123)
    bb = lambda: tiny_vit(**backbone_kwargs)  # noqa: E731
    models = {
        "shallow5_token": PromptedViT(bb(), 7, num_prompts=5, pool="token"),
        "deep3_avg": PromptedViT(bb(), 4, num_prompts=3, deep=True, pool="avg"),
        "deep8_first2_mae": PromptedViT(bb(), 10, num_prompts=8, deep=True, deep_layers=2, pool="mae"),
        "deep3_mae": PromptedViT(bb(), 2, num_prompts=3, deep=True, pool="mae"),
        "shallow1_avg": PromptedViT(bb(), 6, num_prompts=1, pool="avg"),
        "linear_token": ViTClassifier(bb(), 3, pool="token"),
        "linear_mae": ViTClassifier(bb(), 5, pool="mae"),
        "apt4_token": APT(bb(), 5, num_prompts=4, pool="token"),
        "apt6_first2_mae": APT(bb(), 3, num_prompts=6, deep_layers=2, rank=2, pool="mae"),
        "bitfit": BitFit(bb(), 5),
        "full": ViTClassifier(bb(), 4, train_backbone=True),
    }
    with torch.no_grad():
        for name in (
            "apt4_token",
            "apt6_first2_mae",
        ):  # a start of zero W2 and s would hide the keys and scale
            for param in (models[name].prompts, models[name].key_up, models[name].scales):
                param.copy_(torch.randn(param.shape) * 0.5)
        for param in models["bitfit"].biases().values():
            param.add_(torch.randn(param.shape) * 0.3)
        for param in models["full"].backbone.parameters():
            param.add_(torch.randn(param.shape) * 0.02)
    folders = {}
    for k, (name, model) in enumerate(models.items()):
        _randomize_head(model, k)
        folders[name] = model.save_pretrained(root / name)
    return folders


BACKBONES = {"cls": {}, "registers": {"reg_tokens": 2}}


@pytest.fixture(params=list(BACKBONES))
def served(request, tmp_path):
    kwargs = BACKBONES[request.param]
    folders = _make_adapters(tmp_path, kwargs)
    multi = MultiTaskViT(tiny_vit(**kwargs))
    for name, folder in folders.items():
        multi.add_adapter(name, folder)
    singles = {name: load_pretrained(folder, tiny_vit(**kwargs)).eval() for name, folder in folders.items()}
    return multi, singles, kwargs


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _check_rows(multi, singles, images, tasks):
    rows = multi(images, tasks)
    with torch.no_grad():
        expected = {name: singles[name](images) for name in set(tasks)}
    for i, (task, row) in enumerate(zip(tasks, rows, strict=True)):
        assert row.shape == (singles[task].config.num_classes,)
        diff = (row - expected[task][i]).abs().max().item()
        assert diff <= TOL, f"row {i} ({task}): max |diff| {diff}"


def test_every_kind_of_task_in_one_batch_matches_its_own_model(served):
    multi, singles, _ = served
    names = list(singles)
    tasks = [names[i % len(names)] for i in range(2 * len(names) + 3)]
    _check_rows(multi, singles, _images(len(tasks)), tasks)
    assert {n: t.shared for n, t in multi.tasks.items()} == {n: n not in ("bitfit", "full") for n in names}


@pytest.mark.parametrize(
    "tasks",
    [
        ["deep3_avg", "deep3_mae", "deep3_avg"],  # one prompt length: no mask
        ["linear_token", "linear_mae"],  # no prompts at all
        ["shallow5_token", "linear_token", "deep8_first2_mae", "shallow1_avg"],  # several prompt lengths
        ["bitfit", "bitfit"],  # grouped only
        ["shallow5_token"],
        ["apt4_token", "linear_token", "apt6_first2_mae"],  # APT: no prompt tokens, one sequence length
        ["apt6_first2_mae", "deep3_avg", "apt4_token", "shallow1_avg"],
    ],
)
def test_subsets_of_tasks(served, tasks):
    multi, singles, _ = served
    _check_rows(multi, singles, _images(len(tasks), seed=len(tasks)), tasks)


def test_apt_rows_carry_no_prompt_tokens(served):
    multi, _, _ = served
    tasks, bank, index = multi._state
    assert tasks["apt4_token"].num_prompts == tasks["apt6_first2_mae"].num_prompts == 0
    assert bank.lengths[index["apt4_token"]] == 0  # grouped with the linear probes: no group of its own
    apt6 = index["apt6_first2_mae"]
    scales = [terms[2][apt6].item() for terms in bank.attention_terms]  # apt4 keeps all 3 layers' terms
    assert scales[2] == 1 and scales[:2] == pytest.approx(
        multi.tasks["apt6_first2_mae"].model.scales.exp().tolist()
    )
    assert bank.attention_terms[2][0][apt6].abs().sum() == 0  # no keys where it has no prompts


def test_one_padded_pass_with_a_key_mask_gives_the_same_rows(served):
    multi, singles, kwargs = served
    grouped = MultiTaskViT(tiny_vit(**kwargs), mask=True)
    assert grouped.mask and not multi.mask
    for name, task in multi.tasks.items():
        grouped.add_adapter(name, task.source.adapter)
    tasks = list(singles) * 2
    _check_rows(grouped, singles, _images(len(tasks)), tasks)


def test_padded_logits_are_minus_infinity_past_a_row_s_classes(served):
    multi, _, _ = served
    logits, counts = multi.forward_padded(_images(2), ["linear_token", "deep8_first2_mae"])
    assert counts == [3, 10] and logits.shape == (2, 10)
    assert torch.isinf(logits[0, 3:]).all() and torch.isfinite(logits[1]).all()


def test_an_adapter_for_another_backbone_is_refused(tmp_path):
    PromptedViT(tiny_vit(depth=4), 3, num_prompts=2).save_pretrained(tmp_path / "deeper")
    PromptedViT(tiny_vit(embed_dim=48), 3, num_prompts=2).save_pretrained(tmp_path / "wider")
    multi = MultiTaskViT(tiny_vit())
    with pytest.raises(ValueError, match="does not match"):
        multi.add_adapter("deeper", tmp_path / "deeper")
    with pytest.raises(ValueError, match="does not match"):
        multi.add_adapter("wider", tmp_path / "wider")
    assert multi.tasks == {}


def test_only_safetensors_adapters_are_read(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"prompts": torch.zeros(1)}, folder / "adapter.pt")
    multi = MultiTaskViT(tiny_vit())
    with pytest.raises(FileNotFoundError, match="neither"):
        multi.add_adapter("pickled", folder)
    PromptedViT(tiny_vit(), 3, num_prompts=2).save_pretrained(folder)
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        multi.add_adapter("pickled", folder)


def test_names_unknown_and_duplicate_tasks(tmp_path):
    PromptedViT(tiny_vit(), 3, num_prompts=2).save_pretrained(tmp_path / "a")
    multi = MultiTaskViT(tiny_vit())
    multi.add_adapter("a", tmp_path / "a")
    with pytest.raises(ValueError, match="already served"):
        multi.add_adapter("a", tmp_path / "a")
    with pytest.raises(KeyError, match="Unknown task"):
        multi(_images(1), ["b"])
    with pytest.raises(KeyError, match="No task named"):
        multi.remove_adapter("b")


def test_add_and_remove_while_another_thread_serves(tmp_path):
    folders = _make_adapters(tmp_path, {})
    multi = MultiTaskViT(tiny_vit())
    multi.add_adapter("steady", folders["deep3_avg"])
    steady = load_pretrained(folders["deep3_avg"], tiny_vit()).eval()
    images = _images(4)
    with torch.no_grad():
        expected = steady(images)
    errors, done = [], threading.Event()

    def serve():
        try:
            for _ in range(200):
                if done.is_set():
                    break
                got = torch.stack(multi(images, ["steady"] * 4))
                assert (got - expected).abs().max().item() <= TOL
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=serve)
    thread.start()
    for round_ in range(3):
        for name in ("shallow5_token", "bitfit", "linear_mae"):
            multi.add_adapter(f"{name}{round_}", folders[name])
        multi.remove_adapter(f"shallow5_token{round_}")
    done.set()
    thread.join(timeout=60)
    assert not thread.is_alive() and errors == []
    assert set(multi.tasks) == {"steady"} | {f"{n}{r}" for n in ("bitfit", "linear_mae") for r in range(3)}
    singles = {name: load_pretrained(folders[name], tiny_vit()).eval() for name in ("bitfit", "linear_mae")}
    singles |= {f"{n}{r}": singles[n] for n in ("bitfit", "linear_mae") for r in range(3)}
    singles["steady"] = steady
    tasks = ["steady", "bitfit2", "linear_mae0", "linear_mae2"]
    _check_rows(multi, singles, images, tasks)


def test_to_dtype_moves_the_bank_and_the_grouped_models(tmp_path):
    folders = _make_adapters(tmp_path, {})
    multi = MultiTaskViT(tiny_vit())
    for name in ("deep3_avg", "bitfit"):
        multi.add_adapter(name, folders[name])
    multi.to(torch.float64)
    rows = multi(_images(2).double(), ["deep3_avg", "bitfit"])
    assert all(r.dtype == torch.float64 for r in rows)


@pytest.mark.parametrize(
    "kwargs", [{}, {"init_values": 0.1, "qk_norm": True}, {"reg_tokens": 2, "no_embed_class": True}]
)
def test_packed_block_equals_the_block_on_each_length(kwargs):
    block = tiny_vit(**kwargs).blocks[0]
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 65), (1, 70), (4, 80)]
    xs = [torch.randn(b, n, block.norm1.normalized_shape[0], generator=g) for b, n in shapes]
    assert packable([block])
    with torch.no_grad():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        packed = packed_block(block, flat, shapes)
        assert packed is flat  # in place
        for x, y in zip(xs, packed.split([b * n for b, n in shapes]), strict=True):
            assert (y.view(x.shape) - block(x)).abs().max().item() <= 1e-5


def test_blocks_other_than_timm_s_plain_block_run_one_length_at_a_time(tmp_path):
    class Custom(type(tiny_vit().blocks[0])):
        pass

    backbone = tiny_vit()
    backbone.blocks[1].__class__ = Custom
    multi = MultiTaskViT(backbone)
    assert not multi.packed and MultiTaskViT(tiny_vit()).packed
    singles = {}
    for name, m in [("a", 2), ("b", 5)]:
        model = _randomize_head(PromptedViT(tiny_vit(), 3, num_prompts=m, deep=True), m)
        multi.add_adapter(name, model.save_pretrained(tmp_path / name))
        singles[name] = model.eval()
    _check_rows(multi, singles, _images(4), ["a", "b", "b", "a"])
