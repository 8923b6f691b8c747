"""Hub downloads against a protocol double of the Hugging Face Hub (no hub is reachable here):
what is fetched, the size limit, and a download stopped at its time limit."""

import asyncio
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import collect, gen_overrides

from ragmesh.llm.v1 import llm_pb2

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# In the repo beside the tiny model's own files; a load needs none of them.
EXTRAS = {
    "onnx/model.onnx": b"o" * 4096,
    "pytorch_model.bin": b"b" * 4096,
    "modeling_custom.py": b"raise SystemExit('remote code ran')\n",
    "README.md": b"# tiny\n",
}


class HubProtocolDouble:
    """Serves one model repo over the Hub's HTTP API (listing, file metadata, files).

    Files named in `trickle` are sent a byte at a time, forever for practical purposes;
    `dropped` is set when a client goes away in the middle of one.
    """

    def __init__(self, repo: str, files: dict[str, bytes], trickle: frozenset = frozenset()):
        self.repo = repo
        self.files = files
        self.trickle = trickle
        self.fetched: list[str] = []
        self.dropped = threading.Event()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                api = f"/api/models/{double.repo}"
                if path == api or path.startswith(f"{api}/revision/"):
                    siblings = [
                        {"rfilename": name, "size": len(data)}
                        for name, data in double.files.items()
                    ]
                    self._json({"id": double.repo, "sha": COMMIT, "siblings": siblings})
                elif path.startswith(f"{api}/tree/"):
                    tree = [
                        {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                        for name, data in double.files.items()
                    ]
                    self._json(tree)
                elif path.startswith(f"/{double.repo}/resolve/"):
                    name = path.removeprefix(f"/{double.repo}/resolve/").partition("/")[2]
                    self._file(name, body)
                else:
                    self.send_error(404)

            def _file(self, name: str, body: bool) -> None:
                data = double.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{_oid(data)}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not body:
                    return
                double.fetched.append(name)
                try:
                    if name in double.trickle:
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    double.dropped.set()

            def _json(self, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _tiny_files(models_dir: Path) -> dict[str, bytes]:
    folder = models_dir / "tiny"
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub(monkeypatch):
    """Starts a double for a repo; the download process is pointed at it."""
    doubles = []

    def start(repo: str, files: dict[str, bytes], trickle: frozenset = frozenset()):
        double = HubProtocolDouble(repo, files, trickle)
        doubles.append(double)
        monkeypatch.setenv("HF_ENDPOINT", double.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        return double

    yield start
    for double in doubles:
        double.close()


async def test_a_hub_model_downloads_only_the_files_a_load_needs_from_a_hub_double(
    make_client, models_dir, hub
):
    tiny = _tiny_files(models_dir)
    double = hub("acme/tiny-on-hub", {**tiny, **EXTRAS})
    client = await make_client()
    status = await client.load("acme/tiny-on-hub")
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    assert sorted(double.fetched) == sorted(tiny)
    _, completion = await collect(
        client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=gen_overrides(max_new_tokens=3))
        )
    )
    assert completion.model == "acme/tiny-on-hub"


async def test_a_hub_repo_over_the_size_limit_fails_the_load_before_fetching_from_a_hub_double(
    make_client, models_dir, hub
):
    tiny = _tiny_files(models_dir)
    double = hub("acme/too-big", tiny)
    client = await make_client(hub_max_download_bytes=sum(map(len, tiny.values())) - 1)
    status = await client.load("acme/too-big")
    assert status.state == llm_pb2.MODEL_STATE_FAILED
    assert "RAGMESH_LLM_HUB_MAX_DOWNLOAD_BYTES" in status.error
    assert double.fetched == []


async def test_a_download_past_its_time_limit_is_stopped_from_a_hub_double(
    make_client, models_dir, hub
):
    double = hub("acme/slow", _tiny_files(models_dir), trickle=frozenset({"model.safetensors"}))
    # The limit covers the download process's start too, seconds on a busy machine: at 3 s
    # it sometimes ran out before the weights were asked for.
    client = await make_client(hub_download_timeout_seconds=15)
    status = await client.load("acme/slow")
    assert status.state == llm_pb2.MODEL_STATE_FAILED
    assert "RAGMESH_LLM_HUB_DOWNLOAD_TIMEOUT_SECONDS" in status.error
    assert "model.safetensors" in double.fetched
    # The download really stopped: its connection went away mid-file.
    assert await asyncio.to_thread(double.dropped.wait, 60)
