"""Adapters through the Hugging Face Hub, with no network (:mod:`selfprompt.hub`).

Pulling: an adapter's files are laid out as huggingface_hub's own cache holds a downloaded repo
(``HF_HUB_CACHE/models--org--name/snapshots/<commit>/...`` and ``refs/<branch or tag>``) in a temporary
folder, and with ``HF_HUB_OFFLINE=1`` a repo id loads the same model as the local folder, at the revision
asked for (branch, tag, commit, ``@revision``); a repo not in the cache, or holding no adapter, is refused
with a message that says what to do.

Pushing: ``tests/hub_standin.py`` answers the Hub's HTTP API (create repo, create branch, preupload,
commit) on 127.0.0.1, with ``HfApi``'s endpoint pointed at it and offline mode off for those tests only.
It checks what huggingface_hub sends: the repo created (and private), the branch, the commit message, the
token, and the files committed, byte for byte; pulled back through the cache they give the same logits.
It cannot check what only the real Hub does: authentication and permissions, LFS and Xet transfers (it
answers every file "regular", so large adapters' path is not exercised), and the Hub's server-side
validation (repo names, README metadata, size limits).

An ``hf-hub:org/name`` backbone: a timm model saved with timm's ``save_for_hf`` into a cache snapshot is
created offline by ``create_backbone`` with its weights, and adapters record its name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import selfprompt
from selfprompt.adapter import read_config
from selfprompt.backbones import backbone_info, create_backbone
from selfprompt.cli import main
from selfprompt.engine.run import run
from selfprompt.hub import adapter_folder, is_repo_id, push_folder
from selfprompt.methods import load_pretrained
from selfprompt.serving import MultiTaskViT, resolve_source

import huggingface_hub
import pytest
import timm
import torch
from conftest import TINY, tiny_vit
from engine_helpers import make_dataset, tiny_config
from hub_standin import HubServer


def commit_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def put_in_cache(
    cache: Path, repo_id: str, files: Path | dict[str, bytes], refs: tuple[str, ...] = ("main",)
):
    """``files`` (a folder's files, or name -> bytes) as the snapshot of a new commit of ``repo_id`` in the
    Hub cache, which ``refs`` point to; returns the commit id."""
    if isinstance(files, Path):
        files = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit_id(f"{repo_id}:{sorted(files.items())}")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub, online: HfApi's endpoint points at it."""
    with HubServer() as state:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", state.url)
        yield state
    assert state.unexpected == []


def adapter(seed: int) -> selfprompt.PromptedViT:
    """A deep-prompt adapter on the tiny ViT, its prompts and head drawn from ``seed``."""
    model = selfprompt.PromptedViT(tiny_vit(), 4, num_prompts=2, deep=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_a_repo_id_is_org_slash_name_that_is_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("org/name") and is_repo_id("my-org/vit_b.16-cub@v1")
    assert not any(map(is_repo_id, ["name", "a/b/c", "/abs/x", "./a/b", "~/a", "org/", "/org"]))
    (tmp_path / "runs" / "cub").mkdir(parents=True)
    assert not is_repo_id("runs/cub")
    assert adapter_folder("runs/cub") == Path("runs/cub")
    with pytest.raises(ValueError, match="applies to a Hub repo id"):
        adapter_folder("runs/cub", revision="v1")


def test_a_repo_in_the_hub_cache_loads_offline_as_the_local_folder(tmp_path, hub_cache, images):
    folder = adapter(0).save_pretrained(tmp_path / "adapter")
    put_in_cache(hub_cache, "org/cub-vpt", folder)
    expected = logits(load_pretrained(folder, tiny_vit()), images)
    assert torch.equal(logits(load_pretrained("org/cub-vpt", tiny_vit()), images), expected)
    assert torch.equal(
        logits(selfprompt.PromptedViT.from_pretrained("org/cub-vpt", tiny_vit()), images), expected
    )
    source = resolve_source("org/cub-vpt")
    assert source.adapter.parent.parent == hub_cache / "models--org--cub-vpt"
    served = MultiTaskViT(tiny_vit())
    served.add_adapter("cub", Path("org/cub-vpt"))
    assert torch.allclose(torch.stack(served(images, ["cub"] * len(images))), expected, atol=1e-5)


def test_a_revision_picks_its_snapshot(tmp_path, hub_cache, images):
    first = put_in_cache(hub_cache, "org/cub-vpt", adapter(1).save_pretrained(tmp_path / "one"), ("v1",))
    put_in_cache(hub_cache, "org/cub-vpt", adapter(2).save_pretrained(tmp_path / "two"), ("main",))
    one = logits(load_pretrained(tmp_path / "one", tiny_vit()), images)
    two = logits(load_pretrained(tmp_path / "two", tiny_vit()), images)
    assert not torch.allclose(one, two)
    assert torch.equal(logits(load_pretrained("org/cub-vpt", tiny_vit()), images), two)
    for spec, revision in (("org/cub-vpt", "v1"), ("org/cub-vpt", first), ("org/cub-vpt@v1", None)):
        assert torch.equal(logits(load_pretrained(spec, tiny_vit(), revision=revision), images), one)
    assert resolve_source("org/cub-vpt", revision="v1").adapter.name == first
    with pytest.raises(ValueError, match="pins revision 'v1'"):
        adapter_folder("org/cub-vpt@v1", revision="main")
    with pytest.raises(FileNotFoundError, match="revision v9"):
        load_pretrained("org/cub-vpt", tiny_vit(), revision="v9")


def test_a_repo_not_in_the_cache_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained("org/missing", tiny_vit())
    message = str(error.value)
    assert "not in the Hub cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download org/missing" in message and str(hub_cache) in message


def test_a_repo_without_an_adapter_is_refused(hub_cache):
    put_in_cache(hub_cache, "org/backbone", {"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(
        FileNotFoundError, match=r"holds no adapter_config\.json: it is not a selfprompt adapter"
    ):
        resolve_source("org/backbone")


def test_push_to_hub_commits_the_adapter_s_files_and_they_pull_back(
    tmp_path, hub_cache, hub, images, monkeypatch
):
    model = adapter(3)
    url = model.push_to_hub("org/cub-vpt", private=True, token="hf_standin", commit_message="CUB, VPT-deep")
    local = model.save_pretrained(tmp_path / "local")
    sent = hub.files("org/cub-vpt")
    assert sent == {p.name: p.read_bytes() for p in local.iterdir()}
    assert set(sent) == {"README.md", "adapter.safetensors", "adapter_config.json"}  # with its card
    assert hub.repos == {"org/cub-vpt": {"private": True, "type": "model"}}
    assert url == f"{hub.url}/org/cub-vpt/commit/{hub.commits[0].oid}"
    assert hub.commits[0].message == "CUB, VPT-deep"
    assert set(hub.authorizations) == {"Bearer hf_standin"}

    adapter(4).push_to_hub("org/cub-vpt", revision="v2", token="hf_standin")  # the repo exists: kept
    assert hub.branches == {("org/cub-vpt", "v2")} and len(hub.repos) == 1
    assert hub.commits[1].message == "selfprompt PromptedViT adapter"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    put_in_cache(hub_cache, "org/cub-vpt", sent)
    pulled = load_pretrained("org/cub-vpt", tiny_vit())
    assert torch.equal(logits(pulled, images), logits(model, images))


def test_push_refuses_a_folder_that_is_no_adapter_before_any_request(tmp_path, hub):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a selfprompt adapter directory"):
        push_folder(tmp_path / "empty", "org/x")
    with pytest.raises(ValueError, match="org/name"):
        push_folder(adapter(0).save_pretrained(tmp_path / "a"), "org/x@v1")
    assert hub.authorizations == []


def test_selfprompt_push_sends_a_run_s_adapter_or_an_adapter_folder(tmp_path, hub, capsys):
    run_dir = tmp_path / "run"
    run(tiny_config(make_dataset(tmp_path / "data"), run_dir, "vpt-shallow", **{"optim.epochs": 1}))
    assert main(["push", str(run_dir), "org/run", "--stage", "tune", "--token", "hf_standin"]) == 0
    tune = run_dir / "seed0" / "tune" / "adapter"
    assert hub.files("org/run") == {p.name: p.read_bytes() for p in tune.iterdir()}
    assert "Pushed" in capsys.readouterr().out

    folder = adapter(5).save_pretrained(tmp_path / "adapter")
    argv = ["push", str(folder), "org/folder", "--private", "true", "--revision", "dev"]
    assert main([*argv, "--commit_message", "first", "--token", "hf_standin"]) == 0
    assert hub.files("org/folder", "dev") == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert hub.repos["org/folder"]["private"] and hub.commits[-1].message == "first"

    assert main(["push", str(tmp_path / "nothing"), "org/x"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def hub_backbone_in_cache(cache: Path, tmp_path: Path, repo_id: str) -> torch.nn.Module:
    """A tiny timm ViT saved by timm's save_for_hf as the snapshot of ``repo_id``; returns the model."""
    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    timm.models.save_for_hf(model, tmp_path / "export", safe_serialization=True)
    put_in_cache(cache, repo_id, tmp_path / "export")
    return model


def test_an_hf_hub_backbone_is_created_offline_from_the_cache(tmp_path, hub_cache, images):
    saved = hub_backbone_in_cache(hub_cache, tmp_path, "org/tiny-vit")
    backbone = create_backbone("hf-hub:org/tiny-vit")
    with torch.no_grad():
        assert torch.equal(backbone.eval()(images), saved(images))
    assert backbone_info(backbone).name == "hf-hub:org/tiny-vit"
    assert backbone_info(backbone).format == "timm"

    model = selfprompt.PromptedViT(backbone, 3, num_prompts=2)
    folder = model.save_pretrained(tmp_path / "adapter")
    assert read_config(folder)["backbone"]["name"] == "hf-hub:org/tiny-vit"
    again = load_pretrained(folder, create_backbone("hf-hub:org/tiny-vit"))
    assert torch.equal(logits(again, images), logits(model, images))

    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE=1 .*hf download org/absent"):
        create_backbone("hf-hub:org/absent")
