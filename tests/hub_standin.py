"""A local stand-in for the Hugging Face hub: serves one folder as one model repository over HTTP on loopback.

Implements what huggingface_hub's `repo_info` and `snapshot_download` ask for: the model-info JSON (sha and file
list) and HEAD/GET on `/{repo}/resolve/{revision}/{file}` with the commit and ETag headers the client checks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0" * 39 + "1"


def make_handler(repo_id: str, folder: Path, log: list[str], token: str | None):
    files = {p.name: p for p in folder.iterdir() if p.is_file()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _authorized(self) -> bool:
            if token is None or self.headers.get("authorization") == f"Bearer {token}":
                return True
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model is restricted (gated repo).")
            self.end_headers()
            return False

        def _info(self) -> None:
            body = json.dumps(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": [{"rfilename": n} for n in sorted(files)],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, with_body: bool) -> None:
            prefix = f"/{repo_id}/resolve/"
            name = self.path.split("?")[0][len(prefix) :].split("/", 1)[-1]
            if not self.path.startswith(prefix) or name not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            data = files[name].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802
            log.append(f"HEAD {self.path}")
            if self._authorized():
                self._file(with_body=False)

        def do_GET(self) -> None:  # noqa: N802
            log.append(f"GET {self.path}")
            if not self._authorized():
                return
            if self.path.split("?")[0].rstrip("/") in (
                f"/api/models/{repo_id}",
                f"/api/models/{repo_id}/revision/main",
            ):
                self._info()
            elif self.path.startswith("/api/models/"):
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
            else:
                self._file(with_body=True)

    return Handler


@contextmanager
def standin_hub(repo_id: str, folder: Path, token: str | None = None):
    """Yield (endpoint URL, request log) while serving `folder` as `repo_id` on 127.0.0.1."""
    log: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(repo_id, folder, log, token))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
