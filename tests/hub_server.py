"""A small Hugging Face Hub-compatible HTTP server for the tests, on 127.0.0.1, repos in memory.

It answers the routes that `huggingface_hub` calls to create a repo, preupload and commit files
(always in "regular" mode, so contents come base64-encoded inside the commit and no large-file
protocol is needed), list them, and resolve and download them. Every commit keeps a snapshot, so
revisions (branch `main` or a commit sha) resolve as on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self) -> None:
        self.commits: list[tuple[str, dict[str, bytes]]] = []  # (sha, files), oldest first
        self.commit({}, "initial commit")

    def commit(self, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}:{message}:{sorted(files)}".encode()).hexdigest()
        self.commits.append((sha, files))
        return sha

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization header)


def blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made by HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- helpers
    def send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send(
            status,
            body,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
            head=head,
        )

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def route(self) -> list[str]:
        self.state.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
        return [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]

    def repo(self, parts: list[str], head: bool = False) -> Repo | None:
        repo = self.state.repos.get(f"{parts[0]}/{parts[1]}")
        if repo is None:
            self.error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    # -- verbs
    def do_HEAD(self) -> None:
        self.resolve(self.route(), head=True)

    def do_GET(self) -> None:
        parts = self.route()
        if parts[:2] == ["api", "whoami-v2"]:
            return self.send_json(
                {
                    "type": "user",
                    "name": "tester",
                    "fullname": "Test User",
                    "orgs": [],
                    "auth": {"accessToken": {"displayName": "test", "role": "write"}},
                }
            )
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self.repo(parts[2:4])
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                snap = repo.snapshot(rest[1] if rest else "main")
                if snap is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id")
                sha, files = snap
                return self.send_json(
                    {
                        "id": f"{parts[2]}/{parts[3]}",
                        "modelId": f"{parts[2]}/{parts[3]}",
                        "sha": sha,
                        "private": False,
                        "tags": [],
                        "siblings": [{"rfilename": p, "size": len(c)} for p, c in files.items()],
                    }
                )
            if rest[0] == "tree":
                snap = repo.snapshot(rest[1])
                if snap is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id")
                prefix = "/".join(rest[2:])
                entries = [
                    {"type": "file", "path": p, "size": len(c), "oid": blob_id(c)}
                    for p, c in sorted(snap[1].items())
                    if p.startswith(prefix)
                ]
                return self.send_json(entries)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(parts)
        self.error(404, "NotFound", f"no route {self.path}")

    def do_POST(self) -> None:
        parts = self.route()
        data = self.body()
        if parts[:3] == ["api", "repos", "create"]:
            req = json.loads(data)
            repo_id = f"{req.get('organization') or 'tester'}/{req['name']}"
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self.send_json(
                        {"error": "You already created this model repo", "url": f"{self.base()}/{repo_id}"},
                        status=409,
                    )
                self.state.repos[repo_id] = Repo()
            return self.send_json({"url": f"{self.base()}/{repo_id}", "name": repo_id})
        if parts[:2] == ["api", "validate-yaml"]:
            return self.send_json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = self.repo(parts[2:4])
            if repo is None:
                return
            if parts[4] == "preupload":
                files = json.loads(data)["files"]
                return self.send_json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    }
                )
            if parts[4] == "commit":
                return self.commit(repo, parts, data)
        self.error(404, "NotFound", f"no route {self.path}")

    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo: Repo, parts: list[str], data: bytes) -> None:
        with self.state.lock:
            _, files = repo.snapshot("main")
            files = dict(files)
            message = ""
            for line in data.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"].get("summary", "")
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                else:
                    return self.error(400, "BadRequest", f"unsupported commit entry {item['key']}")
            sha = repo.commit(files, message)
        self.send_json(
            {
                "commitUrl": f"{self.base()}/{parts[2]}/{parts[3]}/commit/{sha}",
                "commitOid": sha,
                "success": True,
            }
        )

    def resolve(self, parts: list[str], head: bool = False) -> None:
        if len(parts) < 5 or parts[2] != "resolve":
            return self.error(404, "NotFound", f"no route {self.path}", head=head)
        repo = self.repo(parts[:2], head=head)
        if repo is None:
            return
        snap = repo.snapshot(parts[3])
        if snap is None:
            return self.error(404, "RevisionNotFound", "Invalid rev id", head=head)
        sha, files = snap
        path = "/".join(parts[4:])
        if path not in files:
            return self.error(404, "EntryNotFound", "Entry not found", head=head)
        content = files[path]
        self.send(
            200,
            content,
            {
                "X-Repo-Commit": sha,
                "ETag": f'"{blob_id(content)}"',
                "Content-Type": "application/octet-stream",
            },
            head=head,
        )


class HubServer:
    """Start with `with HubServer() as hub:`; hub.url is the endpoint for HF_ENDPOINT."""

    def __init__(self, port: int = 0) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
