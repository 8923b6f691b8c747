"""Fixtures for the ingest tests: a real embed server, real SQLite and PostgreSQL, and an
ingest server per database backend."""

import asyncio
import io
import itertools
import json
import os
import socket
import sys
import zipfile
from pathlib import Path

import grpc
import pytest
from rpc_errors import error_info

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.clients import wait_until_serving
from services.embed.app import start as start_embed
from services.embed.model import load_model
from services.embed.settings import EmbedSettings
from services.ingest.app import start as start_ingest
from services.ingest.settings import IngestSettings

TERMINAL = {
    ingest_pb2.DOCUMENT_STATUS_READY,
    ingest_pb2.DOCUMENT_STATUS_FAILED,
    ingest_pb2.DOCUMENT_STATUS_DELETING,
}
API_KEYS = {f"key-{n}": f"user-{n}:tenant-{n}" for n in range(400)}
_next_key = itertools.count()
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
async def embed_server(tmp_path_factory):
    settings = EmbedSettings(
        host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("embed"), max_wait_ms=5
    )
    app = await start_embed(settings, model=load_model("all-MiniLM-L6-v2", "cpu"))
    yield f"127.0.0.1:{app.server.port}"
    await app.server.stop(0)
    await app.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def make_settings(backend, embed_server, request):
    """Settings for an ingest server on a fresh database of the current backend."""

    create_database = request.getfixturevalue("postgres") if backend == "postgresql" else None

    def make(data_dir: Path, **overrides) -> IngestSettings:
        url = create_database() if create_database else ""
        values = dict(
            host="127.0.0.1",
            port=0,
            data_dir=data_dir,
            database_url=url,
            # PostgreSQL without a Qdrant server: each replica's own Edge shard.
            edge_catch_up=bool(url),
            embed_target=embed_server,
            api_keys=API_KEYS,
            workers=2,
            job_poll_seconds=0.2,
            chunk_tokens=64,
            chunk_overlap_tokens=8,
            max_upload_bytes=2 * 1024 * 1024,
            max_docx_uncompressed_bytes=4 * 1024 * 1024,
        )
        values.update(overrides)
        return IngestSettings(**values)

    return make


@pytest.fixture(scope="session")
async def ingest_app(make_settings, tmp_path_factory, backend):
    app = await start_ingest(make_settings(tmp_path_factory.mktemp(f"ingest-{backend}")))
    yield app
    await app.server.stop(0)
    await app.close()


class EmbedProxy:
    """A real gRPC server in front of the embed service, which a test can hold or fail.

    Embed calls wait while `gate` is clear (`held` is set once one waits, `cancelled` once
    its caller gives up on it); once `fail_after` Embed calls have been answered, later
    ones fail with INVALID_ARGUMENT. Everything else passes through unchanged."""

    SERVICE = "ragmesh.embed.v1.EmbedService"

    def __init__(self, target: str) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.answered = 0
        self.fail_after: int | None = None
        self._channel = grpc.aio.insecure_channel(target)
        self._server = grpc.aio.server()
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(self._forward(method))
            for method in ("Embed", "Tokenize", "GetModelInfo")
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, handlers),)
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def _forward(self, method: str):
        upstream = self._channel.unary_unary(f"/{self.SERVICE}/{method}")

        async def handle(request: bytes, context) -> bytes:
            if method != "Embed":
                return await upstream(request)
            if self.fail_after is not None and self.answered >= self.fail_after:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the test")
            if not self.gate.is_set():
                self.held.set()
                try:
                    await self.gate.wait()
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            reply = await upstream(request)
            self.answered += 1
            return reply

        return handle

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.stop(0)
        await self._channel.close()


@pytest.fixture
async def embed_proxy(embed_server):
    proxy = EmbedProxy(embed_server)
    await proxy.start()
    yield proxy
    await proxy.close()


def environment(settings: IngestSettings) -> dict[str, str]:
    """The environment that gives a process of its own these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
            env[f"RAGMESH_INGEST_{name.upper()}"] = text
    return env


class IngestProcess:
    """The ingest service in a process of its own (`python -m services.ingest`), so a test
    can kill it the way a crash or the kernel's OOM killer does: no shutdown, no cleanup."""

    def __init__(self, settings: IngestSettings, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.target = f"127.0.0.1:{port}"
        self._env = environment(settings.model_copy(update={"port": port}))
        self._log = log
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        with self._log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.ingest",
                cwd=REPO_ROOT,
                env=self._env,
                stdout=log,
                stderr=log,
            )
        process = self._process
        await wait_until_serving(self.target, 60, lambda: process.returncode is None)
        return self.target

    async def kill(self) -> None:
        """SIGKILL: the process gets no chance to hand its job leases back."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@pytest.fixture
async def ingest_process():
    """Makes IngestProcess objects; any still running at the end of the test is killed."""
    made: list[IngestProcess] = []

    def make(settings: IngestSettings, log: Path) -> IngestProcess:
        made.append(IngestProcess(settings, log))
        return made[-1]

    yield make
    for process in made:
        await process.kill()


class Client:
    """One tenant's view of an ingest server."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self.stub = ingest_pb2_grpc.IngestServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.tenant = API_KEYS[key].split(":")[1]

    def upload_call(self, filename: str, pieces, **meta):
        def requests():
            yield ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(filename=filename, **meta)
            )
            for piece in pieces:
                yield ingest_pb2.UploadDocumentRequest(data=piece)

        return self.stub.UploadDocument(requests(), metadata=self.metadata)

    async def upload(self, filename: str, data: bytes, **meta):
        pieces = [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
        return await self.upload_call(filename, pieces, **meta)

    async def watch(self, document_id: str) -> list[ingest_pb2.Document]:
        call = self.stub.WatchDocument(
            ingest_pb2.WatchDocumentRequest(document_id=document_id),
            metadata=self.metadata,
            timeout=120,
        )
        return [reply.document async for reply in call]

    async def ingest(self, filename: str, data: bytes, **meta) -> ingest_pb2.Document:
        """Uploads and waits for a terminal state."""
        reply = await self.upload(filename, data, **meta)
        return (await self.watch(reply.document.id))[-1]

    async def call(self, method: str, **fields):
        request_type = getattr(ingest_pb2, f"{method}Request")
        return await getattr(self.stub, method)(request_type(**fields), metadata=self.metadata)


@pytest.fixture(scope="session")
async def ingest_channel(ingest_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest_app.server.port}") as channel:
        yield channel


@pytest.fixture
def client(ingest_channel) -> Client:
    """A client in a tenant of its own, so tests never see each other's documents."""
    return Client(ingest_channel, f"key-{next(_next_key)}")


@pytest.fixture
def new_client():
    return lambda channel: Client(channel, f"key-{next(_next_key)}")


@pytest.fixture
def reason_of():
    return lambda exc: error_info(exc).reason


@pytest.fixture
def eventually():
    """Waits for a condition the server reaches in the background (no timing asserted)."""

    async def wait(condition):
        async with asyncio.timeout(30):
            # The state lives in files and databases, which signal nothing: poll it.
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    return wait


class Samples:
    """Files of every supported type, good and hostile, generated on the spot."""

    @staticmethod
    def pdf(pages: list[str], *, user_password: str | None = None, owner_password="owner"):
        from reportlab.pdfgen import canvas

        buffer = io.BytesIO()
        encrypt = None
        if user_password is not None:
            from reportlab.lib.pdfencrypt import StandardEncryption

            encrypt = StandardEncryption(user_password, ownerPassword=owner_password)
        pdf = canvas.Canvas(buffer, encrypt=encrypt)
        for text in pages:
            y = 800
            for line in text.split("\n"):
                pdf.drawString(72, y, line)
                y -= 16
            pdf.showPage()
        pdf.save()
        return buffer.getvalue()

    @staticmethod
    def docx() -> bytes:
        import docx

        document = docx.Document()
        document.sections[0].header.paragraphs[0].text = "Confidential header line"
        document.add_heading("Installation", level=1)
        document.add_paragraph("Install the package with pip and start the server.")
        document.add_heading("Configuration", level=2)
        document.add_paragraph("Settings come from environment variables.")
        table = document.add_table(rows=2, cols=2)
        table.cell(0, 0).text = "Setting"
        table.cell(0, 1).text = "Default"
        table.cell(1, 0).text = "port"
        table.cell(1, 1).text = "50051"
        buffer = io.BytesIO()
        document.save(buffer)
        return buffer.getvalue()

    @staticmethod
    def docx_with_part(name: str, content: bytes, *, base: bytes) -> bytes:
        """A real DOCX with one part replaced (streamed, so big parts stay cheap)."""
        source = zipfile.ZipFile(io.BytesIO(base))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename != name:
                    target.writestr(info, source.read(info))
            with target.open(name, "w") as part:
                part.write(content)
        return buffer.getvalue()

    @staticmethod
    def zip_bomb(base: bytes, expanded: int) -> bytes:
        source = zipfile.ZipFile(io.BytesIO(base))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename != "word/document.xml":
                    target.writestr(info, source.read(info))
            with target.open("word/document.xml", "w", force_zip64=True) as part:
                block = b" " * (1024 * 1024)
                for _ in range(expanded // len(block)):
                    part.write(block)
        return buffer.getvalue()


@pytest.fixture(scope="session")
def samples():
    return Samples
