"""Embed only busy (its queue full, RESOURCE_EXHAUSTED QUEUE_FULL) delays a document: ingest
retries it with backoff and it ends READY, not FAILED. An upstream answer that no retry can
change (too many texts for one request, a refusal without reason) is not taken for busy.

A real embed server with a tiny queue (RAGMESH_EMBED_MAX_QUEUED_TEXTS=4), kept full by a
caller of its own that floods it with long texts."""

import asyncio
import contextlib
import logging

import grpc
import pytest

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2
from services.common.errors import ServiceError
from services.embed.app import start as start_embed
from services.embed.model import load_model
from services.embed.settings import EmbedSettings
from services.ingest.app import start as start_ingest
from services.ingest.embed_client import EmbedClient

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")
QUEUE = 4
LONG_TEXT = " ".join(f"word{n} of a long text that keeps the model busy" for n in range(60))
FULL_MARK = "RAGMESH_EMBED_MAX_QUEUED_TEXTS"


@pytest.fixture(scope="module")
async def small_embed(tmp_path_factory):
    """An embed server whose queue holds one request of at most QUEUE texts."""
    settings = EmbedSettings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path_factory.mktemp("embed-busy"),
        max_texts_per_request=QUEUE,
        max_queued_texts=QUEUE,
        max_batch_size=QUEUE,
    )
    app = await start_embed(settings, model=load_model("all-MiniLM-L6-v2", "cpu"))
    yield f"127.0.0.1:{app.server.port}"
    await app.server.stop(0)
    await app.close()


class Flood:
    """Callers of their own that keep embed's queue full until stopped."""

    def __init__(self, target: str, callers: int = 6) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = embed_pb2_grpc.EmbedServiceStub(self._channel)
        self.refused = 0
        self._tasks = [asyncio.create_task(self._call()) for _ in range(callers)]

    async def _call(self) -> None:
        request = embed_pb2.EmbedRequest(texts=[LONG_TEXT] * QUEUE)
        while True:
            try:
                await self._stub.Embed(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.refused += 1

    async def full(self) -> None:
        """Waits until embed has refused one of the flood's calls: its queue is full."""
        async with asyncio.timeout(60):
            while not self.refused:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if not self._tasks:
            return
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._channel.close()


def _worker_lines(caplog, document_id: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "services.ingest.worker" and document_id in record.getMessage()
    ]


async def test_a_document_met_by_a_full_embed_queue_is_retried_and_ends_ready(
    make_settings, tmp_path, small_embed, new_client, caplog
):
    caplog.set_level(logging.INFO, logger="services.ingest.worker")
    app = await start_ingest(
        make_settings(tmp_path, embed_target=small_embed, embed_batch_size=QUEUE)
    )
    flood = Flood(small_embed)
    try:
        await flood.full()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            text = "\n\n".join(f"Paragraph {n}: {LONG_TEXT}" for n in range(3))
            document_id = (await client.upload("busy.txt", text.encode())).document.id

            # The flood lasts until ingest has met the full queue (its worker logs the
            # refusal), so the test cannot pass without ingest being refused.
            async with asyncio.timeout(60):
                while not any(  # noqa: ASYNC110
                    FULL_MARK in line for line in _worker_lines(caplog, document_id)
                ):
                    await asyncio.sleep(0.05)
            await flood.stop()

            document = (await client.watch(document_id))[-1]
            assert document.status == READY, document.error
            assert document.chunk_count > 0
            busy = [line for line in _worker_lines(caplog, document_id) if FULL_MARK in line]
            assert all("; retry " in line for line in busy), busy
    finally:
        await flood.stop()
        await app.server.stop(0)
        await app.close()


async def test_the_embed_client_tells_a_full_queue_from_a_request_that_never_fits(small_embed):
    client = EmbedClient(small_embed, timeout=30)
    flood = Flood(small_embed)
    try:
        await flood.full()
        # More texts than the queue can ever hold: told so, full queue or not.
        with pytest.raises(ServiceError) as never_fits:
            await client.embed(["one text"] * (QUEUE + 1))
        assert never_fits.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert never_fits.value.metadata["upstream_reason"] == "TOO_MANY_TEXTS"

        async with asyncio.timeout(60):
            while True:
                try:
                    await client.embed(["a short text"] * QUEUE)
                except ServiceError as exc:
                    busy = exc
                    break
        assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert FULL_MARK in busy.message
        assert busy.metadata == {
            "upstream": "embed",
            "upstream_code": "RESOURCE_EXHAUSTED",
            "upstream_reason": "QUEUE_FULL",
            "limit": str(QUEUE),
        }
    finally:
        await flood.stop()
        await client.close()


async def test_an_upstream_refusal_without_a_reason_fails_the_document(
    make_settings, tmp_path, embed_proxy, new_client
):
    # The proxy refuses Embed with a bare INVALID_ARGUMENT (no ErrorInfo): not busy.
    embed_proxy.fail_after = 0
    app = await start_ingest(make_settings(tmp_path, embed_target=embed_proxy.target))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            document = await client.ingest("refused.txt", b"text that embed refuses")
            assert document.status == ingest_pb2.DOCUMENT_STATUS_FAILED
            assert "refused by the test" in document.error
            assert "gave up after" not in document.error
    finally:
        await app.server.stop(0)
        await app.close()
