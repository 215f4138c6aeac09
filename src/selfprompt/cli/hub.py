"""``selfprompt push``: a trained adapter shared on the Hugging Face Hub (``selfprompt.hub``)."""

from __future__ import annotations

from selfprompt.cli.command import Command

from jsonargparse import ArgumentParser, Namespace


def _push_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="selfprompt push",
        description="Push a run's adapter (or an adapter folder) to a Hugging Face Hub model repo, created "
        "if missing; the token is --token, else $HF_TOKEN, else the one `hf auth login` saved.",
    )
    parser.add_argument("source", type=str, help="RUN_OR_ADAPTER: a run folder or an adapter folder.")
    parser.add_argument("repo_id", type=str, help="ORG/REPO: the Hub model repo to commit to.")
    parser.add_argument("--seed", type=int | None, default=None, help="A run's seed (default: its first).")
    parser.add_argument(
        "--stage", type=str | None, default=None, help="A run's stage (default: final, else tune)."
    )
    parser.add_argument("--ema", type=bool, default=False, help="A run's EMA weights (optim.ema_decay).")
    parser.add_argument("--private", type=bool, default=False, help="Create the repo private.")
    parser.add_argument(
        "--revision", type=str | None, default=None, help="The branch to commit to (default: main)."
    )
    parser.add_argument("--token", type=str | None, default=None, help="A Hub token with write access.")
    parser.add_argument("--commit_message", type=str | None, default=None, help="The commit's message.")
    return parser


def _push(args: Namespace) -> None:
    from selfprompt.hub import push_folder
    from selfprompt.serving.sources import resolve_source

    adapter = resolve_source(args.source, args.seed, args.stage, args.ema).adapter
    url = push_folder(
        adapter,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"Pushed {adapter} to {args.repo_id}: {url}")


COMMANDS = [Command("push", "Share a trained adapter on the Hugging Face Hub.", _push_parser, _push)]
