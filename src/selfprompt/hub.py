"""Adapters shared through the Hugging Face Hub: a repo id (``org/name``) where an adapter folder is taken,
and an adapter folder pushed to a repo, through ``huggingface_hub`` (its cache, token and offline mode).

A repo id is read through ``huggingface_hub.snapshot_download``: online it downloads the repo's files into
the Hub cache (``HF_HUB_CACHE``), offline (``HF_HUB_OFFLINE=1``) it reads the snapshot already there. Pushing
creates the repo if it does not exist (and the branch ``revision`` names) and commits the folder's files.
"""

from __future__ import annotations

import re
from pathlib import Path

from selfprompt.adapter import CONFIG_NAME, WEIGHTS_NAME, read_config

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# ``org/name`` with an optional ``@revision``: the Hub's characters for owners and repo names
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[^@\s]+))?")


def is_repo_id(spec: str | Path) -> bool:
    """Whether ``spec`` names a Hub repo: ``org/name`` (optionally ``@revision``) that is not a local path."""
    text = str(spec)
    return _REPO_ID.fullmatch(text) is not None and not Path(text).expanduser().exists()


def adapter_folder(spec: str | Path, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local folder of the adapter ``spec``: a local path as is (checked by whoever reads it), a Hub repo
    id (``org/name``, or ``org/name@revision``) as its snapshot in the Hub cache, downloaded unless offline.

    Raises FileNotFoundError for a repo that is not in the cache while offline, a repo or revision the Hub
    does not have, and a repo that holds no adapter; ValueError for ``revision`` with a local path."""
    if not is_repo_id(spec):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub repo id (org/name); {spec} is a path.")
        return Path(spec)
    match = _REPO_ID.fullmatch(str(spec))
    repo_id, pinned = match["repo"], match["revision"]
    if pinned is not None and revision is not None and pinned != revision:
        raise ValueError(f"{spec} pins revision {pinned!r} and revision={revision!r} was also given.")
    revision = pinned or revision
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token))
    except (RepositoryNotFoundError, GatedRepoError):
        raise FileNotFoundError(
            f"{spec} is not a local folder, and the Hub has no repo {repo_id} that this token may read: "
            f"check the name, or log in (hf auth login, or pass a token) for a private or gated repo."
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"The Hub repo {repo_id} has no revision {revision!r}: pass a branch, tag or commit it holds."
        ) from None
    except LocalEntryNotFoundError as error:
        if constants.is_offline_mode():
            raise FileNotFoundError(
                f"{spec} is not a local folder, and the Hub repo {where} is not in the Hub cache "
                f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids downloading it: download it once "
                f"online (unset HF_HUB_OFFLINE, or run `hf download {repo_id}`), or pass a local adapter "
                f"folder."
            ) from None
        raise FileNotFoundError(
            f"{spec} is not a local folder, and the Hub repo {where} could not be downloaded nor found in "
            f"the Hub cache ({constants.HF_HUB_CACHE}): {error}"
        ) from None
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"The Hub repo {where} holds no {CONFIG_NAME}: it is not a selfprompt adapter (share one with "
            f"`selfprompt push` or model.push_to_hub)."
        )
    return folder


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Commit the adapter folder ``folder`` to the Hub model repo ``repo_id`` (created if missing, private
    when ``private``) on the branch ``revision`` (created if missing; default ``main``); returns the commit's
    URL. The folder is checked to be a readable adapter first."""
    folder = Path(folder)
    config = read_config(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_NAME} is missing: the adapter folder is incomplete.")
    if _REPO_ID.fullmatch(repo_id) is None or "@" in repo_id:
        raise ValueError(f"Push to a Hub repo id, org/name; got {repo_id!r}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or f"selfprompt {config['class']} adapter",
    )
    return commit.commit_url
