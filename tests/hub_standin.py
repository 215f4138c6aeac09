"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints ``HfApi.create_repo``,
``create_branch`` and ``upload_folder`` (preupload, commit) call, on a threaded ``http.server``.

Every file is answered upload mode ``regular``, so its bytes travel base64 inside the commit's ndjson
(no LFS or Xet transfer), and the stand-in keeps what each commit wrote per repo and branch. It checks the
requests' shape (paths, JSON bodies, the ndjson header and file lines) and records the Authorization
header; it does not check a token, a repo's visibility nor anything the Hub validates server side.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Commit:
    repo: str
    branch: str
    message: str
    files: dict[str, bytes]
    oid: str


@dataclass
class HubStandIn:
    """What the stand-in received: repos created (``{repo: {"private": ...}}``), branches, commits and the
    Authorization header of every request."""

    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    branches: set[tuple[str, str]] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    url: str = ""

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        """The files of ``repo`` at ``branch`` after every commit."""
        found: dict[str, bytes] = {}
        for commit in self.commits:
            if commit.repo == repo and commit.branch == branch:
                found |= commit.files
        return found


def _handler(state: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            state.authorizations.append(self.headers.get("Authorization"))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload['organization']}/{payload['name']}"
                if repo in state.repos:
                    body = {"error": "You already created this model repo", "url": f"{state.url}/{repo}"}
                    return self._reply(409, body)
                state.repos[repo] = {
                    "private": payload.get("visibility") == "private",
                    "type": payload.get("type", "model"),
                }
                return self._reply(200, {"url": f"{state.url}/{repo}"})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if match := re.fullmatch(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", path):
                state.branches.add((match["repo"], match["branch"]))
                return self._reply(200, {})
            if match := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<branch>[^/]+)", path):
                files = json.loads(body)["files"]
                answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": answer})
            if match := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<branch>[^/]+)", path):
                return self._commit(match["repo"], match["branch"], body)
            state.unexpected.append(f"POST {self.path}")
            return self._reply(404, {"error": f"the stand-in does not serve POST {self.path}"})

        def _commit(self, repo: str, branch: str, body: bytes) -> None:
            if self.headers.get("Content-Type") != "application/x-ndjson":
                return self._reply(400, {"error": "a commit is ndjson"})
            if repo not in state.repos:
                return self._reply(404, {"error": f"Repository {repo} not found"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            if lines[0]["key"] != "header":
                return self._reply(400, {"error": "the first line is the header"})
            files = {}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"]["encoding"] != "base64":
                    return self._reply(400, {"error": f"the stand-in takes regular files, got {line['key']}"})
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            state.commits.append(Commit(repo, branch, lines[0]["value"]["summary"], files, oid))
            return self._reply(200, {"commitUrl": f"{state.url}/{repo}/commit/{oid}", "commitOid": oid})

        def do_GET(self) -> None:
            state.unexpected.append(f"GET {self.path}")
            self._reply(404, {"error": f"the stand-in does not serve GET {self.path}"})

    return Handler


class HubServer:
    """``with HubServer() as hub:``: the stand-in listening on 127.0.0.1 (``hub.url``) in a thread."""

    def __enter__(self) -> HubStandIn:
        self.state = HubStandIn()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.state.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.state

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
