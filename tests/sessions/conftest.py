"""Fixtures for the sessions tests: the real mesh (embed, ingest, llm with SmolLM2) on
loopback ports, an llm proxy that records and can fault what sessions sends, and a
sessions server per database backend."""

import asyncio
import contextlib

import grpc
import pytest

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.embed.app import start as start_embed
from services.embed.model import load_model
from services.embed.settings import EmbedSettings
from services.ingest.app import start as start_ingest
from services.ingest.settings import IngestSettings
from services.llm.app import start as start_llm
from services.llm.settings import LlmSettings
from services.sessions.app import start as start_sessions
from services.sessions.settings import SessionsSettings

API_KEYS = {
    "alice-key": "alice:acme",
    "bob-key": "bob:globex",
}
ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("authorization", "Bearer bob-key"),)


@pytest.fixture(scope="session")
async def embed_target(tmp_path_factory):
    settings = EmbedSettings(port=0, data_dir=tmp_path_factory.mktemp("embed"), max_wait_ms=5)
    app = await start_embed(settings, model=load_model("all-MiniLM-L6-v2", "cpu"))
    yield f"127.0.0.1:{app.server.port}"
    await app.server.stop(0)
    await app.close()


@pytest.fixture(scope="session")
async def ingest_target(embed_target, tmp_path_factory):
    settings = IngestSettings(
        port=0,
        data_dir=tmp_path_factory.mktemp("ingest"),
        embed_target=embed_target,
        api_keys=API_KEYS,
        job_poll_seconds=0.2,
        chunk_tokens=64,
        chunk_overlap_tokens=8,
    )
    app = await start_ingest(settings)
    yield f"127.0.0.1:{app.server.port}"
    await app.server.stop(0)
    await app.close()


@contextlib.asynccontextmanager
async def serving_llm(data, **settings):
    """An llm service with the default model (the packaged GGUF, on llama.cpp) READY,
    with settings beside the defaults; its target."""
    app = await start_llm(
        LlmSettings(
            port=0,
            data_dir=data,
            models_dir=data / "models",
            api_keys=API_KEYS,
            shutdown_grace_seconds=0.5,
            **settings,
        )
    )
    try:
        target = f"127.0.0.1:{app.server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            watch = stub.WatchModelStatus(llm_pb2.WatchModelStatusRequest(), metadata=ALICE)
            async for update in watch:
                if update.status.state == llm_pb2.MODEL_STATE_READY:
                    break
                assert update.status.state != llm_pb2.MODEL_STATE_FAILED, update.status.error
            watch.cancel()
        yield target
    finally:
        await app.server.stop(0)
        await app.close()


@pytest.fixture(scope="session")
async def llm_target(tmp_path_factory):
    async with serving_llm(tmp_path_factory.mktemp("llm")) as target:
        yield target


class LlmProxy:
    """A real gRPC server in front of the llm service that records every Chat request
    (and the deadline it carried) and, when a test asks, fails a Chat stream after some
    deltas — the way an llm pod dying mid-answer looks to sessions. Everything else
    passes through unchanged."""

    def __init__(self, target: str) -> None:
        self.chats: list[llm_pb2.ChatRequest] = []
        self.deadlines: list[float | None] = []
        self.cancels: list[str] = []
        self.fail_after_deltas: int | None = None
        self.delta_delay = 0.0
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = llm_pb2_grpc.LlmServiceStub(self._channel)
        self._server = grpc.aio.server()
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self._Servicer(self), self._server)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    class _Servicer(llm_pb2_grpc.LlmServiceServicer):
        def __init__(self, proxy: "LlmProxy") -> None:
            self.proxy = proxy

        @staticmethod
        def _metadata(context):
            return tuple((k, v) for k, v in context.invocation_metadata() if k == "authorization")

        async def GetModelStatus(self, request, context):
            return await self.proxy._stub.GetModelStatus(request, metadata=self._metadata(context))

        async def CountTokens(self, request, context):
            return await self.proxy._stub.CountTokens(request, metadata=self._metadata(context))

        async def Cancel(self, request, context):
            self.proxy.cancels.append(request.request_id)
            try:
                return await self.proxy._stub.Cancel(request, metadata=self._metadata(context))
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details())

        async def Chat(self, request, context):
            proxy = self.proxy
            proxy.chats.append(request)
            proxy.deadlines.append(context.time_remaining())
            call = proxy._stub.Chat(
                request, metadata=self._metadata(context), timeout=context.time_remaining()
            )
            deltas = 0
            try:
                async for event in call:
                    if event.WhichOneof("event") == "delta":
                        if (
                            proxy.fail_after_deltas is not None
                            and deltas >= proxy.fail_after_deltas
                        ):
                            await context.abort(
                                grpc.StatusCode.UNAVAILABLE, "the llm pod went away (test)"
                            )
                        deltas += 1
                        await asyncio.sleep(proxy.delta_delay)
                    yield event
            finally:
                call.cancel()

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.stop(0)
        await self._channel.close()


@pytest.fixture
async def llm_proxy(llm_target):
    proxy = LlmProxy(llm_target)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture
async def make_sessions(backend, request, tmp_path, embed_target, ingest_target, llm_target):
    """Starts sessions servers on a fresh database of the current backend; each test gets
    clients through `Sessions`."""
    started = []

    async def make(**overrides) -> "Sessions":
        url = request.getfixturevalue("postgres")() if backend == "postgresql" else ""
        values = dict(
            port=0,
            data_dir=tmp_path / f"sessions-{len(started)}",
            database_url=url,
            api_keys=API_KEYS,
            ingest_target=ingest_target,
            embed_target=embed_target,
            llm_target=llm_target,
        )
        values.update(overrides)
        app = await start_sessions(SessionsSettings(**values))
        client = Sessions(app)
        started.append(client)
        return client

    yield make
    for client in started:
        await client.close()


class Sessions:
    """A started sessions service and stubs over a real channel."""

    def __init__(self, app) -> None:
        self.app = app
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
        self.stub = sessions_pb2_grpc.SessionsServiceStub(self.channel)

    async def send(self, session_id: str, content: str, metadata=ALICE, **fields):
        """SendMessage's events, in order, grouped by kind."""
        fields.setdefault(
            "overrides", llm_pb2.GenerationOverrides(max_new_tokens=24, temperature=0)
        )
        call = self.stub.SendMessage(
            sessions_pb2.SendMessageRequest(session_id=session_id, content=content, **fields),
            metadata=metadata,
            timeout=300,
        )
        return [event async for event in call]

    async def memory_settled(self) -> None:
        """Waits until every stored exchange is in memory, with its tags."""
        while await self.app.memory.index_pending():
            pass

    async def close(self) -> None:
        await self.channel.close()
        await self.app.server.stop(0)
        await self.app.close()


async def upload(ingest_target: str, filename: str, text: str, metadata=ALICE) -> str:
    """Uploads a document into ingest and waits until it is READY; returns its id."""
    async with grpc.aio.insecure_channel(ingest_target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        def requests():
            yield ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(filename=filename)
            )
            yield ingest_pb2.UploadDocumentRequest(data=text.encode())

        uploaded = await stub.UploadDocument(requests(), metadata=metadata)
        watch = stub.WatchDocument(
            ingest_pb2.WatchDocumentRequest(document_id=uploaded.document.id),
            metadata=metadata,
            timeout=120,
        )
        last = [reply.document async for reply in watch][-1]
        assert last.status == ingest_pb2.DOCUMENT_STATUS_READY, last.error
        return uploaded.document.id
