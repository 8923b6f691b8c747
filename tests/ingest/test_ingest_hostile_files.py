"""Files built to hang a parser or balloon its memory: parsing runs in a child process that
is stopped at PARSE_TIMEOUT_SECONDS or PARSE_MEMORY_BYTES, the document FAILS with the limit
named, and a good document uploaded alongside is READY (the one worker goes on); deleting
a document while it parses kills its parser. Parsing does not depend on the database, so
these run on SQLite only."""

import io
import os
import signal
import time
import zipfile
import zlib
from pathlib import Path

import grpc
import pytest

from ragmesh.ingest.v1 import ingest_pb2
from services.ingest.app import start
from services.ingest.parsers import TEXT

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")
FAILED = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_FAILED")
GOOD = b"A plain report uploaded next to the hostile file."


def _endless_pdf(pages: int = 1000, operators: int = 200_000) -> bytes:
    """A 150 KB PDF whose pages share one content stream that inflates to 200,000 text
    operators: pypdf works seconds per page, hours on the whole file."""
    content = b"BT /F1 12 Tf " + b"(x) Tj " * operators + b"ET"
    stream = zlib.compress(content, 9)
    kids = b" ".join(b"%d 0 R" % (5 + n) for n in range(pages))
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(stream), stream),
        *[page] * pages,
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def _ballooning_docx(base: bytes, paragraphs: int = 4_500_000) -> bytes:
    """A 450 KB DOCX under the 200 MiB expansion cap whose document part is 157 MB of
    one-word paragraphs: an XML tree of 13 million elements, gigabytes in memory."""
    source = zipfile.ZipFile(io.BytesIO(base))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename != "word/document.xml":
                target.writestr(info, source.read(info))
        with target.open("word/document.xml", "w") as part:
            part.write(
                b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/'
                b'main"><w:body>'
            )
            block = b"<w:p><w:r><w:t>x</w:t></w:r></w:p>" * 100_000
            for _ in range(paragraphs // 100_000):
                part.write(block)
            part.write(b"</w:body></w:document>")
    return buffer.getvalue()


async def _hostile_next_to_a_good_one(settings, new_client, filename: str, data: bytes):
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            hostile = await client.upload(filename, data)
            good = await client.upload("good.txt", GOOD)
            hostile_states = await client.watch(hostile.document.id)
            good_states = await client.watch(good.document.id)
            assert good_states[-1].status == READY, good_states[-1].error
            text = await client.call("GetDocumentText", document_id=good.document.id)
            assert text.text == GOOD.decode()
            # The worker goes on after the kill: a later file is parsed too.
            later = await client.ingest("later.txt", b"Uploaded after the hostile file failed.")
            assert later.status == READY, later.error
            return hostile_states
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_parser_that_never_finishes_is_stopped_at_the_time_limit(
    make_settings, tmp_path, new_client
):
    # One worker: the good file waits behind the hostile one, so it is READY only because
    # the worker was given back when the parse was stopped.
    settings = make_settings(tmp_path, workers=1, parse_timeout_seconds=3)
    states = await _hostile_next_to_a_good_one(settings, new_client, "endless.pdf", _endless_pdf())
    assert states[-1].status == FAILED
    assert "longer than the limit of 3 s" in states[-1].error
    assert "PARSE_TIMEOUT_SECONDS" in states[-1].error


async def test_a_file_that_balloons_the_parser_memory_is_stopped_at_the_cap(
    make_settings, tmp_path, new_client, samples
):
    settings = make_settings(
        tmp_path,
        workers=1,
        parse_memory_bytes=512 * 1024 * 1024,
        max_docx_uncompressed_bytes=200 * 1024 * 1024,
    )
    states = await _hostile_next_to_a_good_one(
        settings, new_client, "balloon.docx", _ballooning_docx(samples.docx())
    )
    assert states[-1].status == FAILED
    assert "more memory than the limit of 512 MiB" in states[-1].error
    assert "PARSE_MEMORY_BYTES" in states[-1].error


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or reaped between the open and the read.
        return False
    return state != "Z"


async def test_deleting_a_document_kills_its_parse(make_settings, tmp_path, new_client, eventually):
    settings = make_settings(tmp_path, workers=1)
    app = await start(settings)
    parsers = app.workers._parsers
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            hostile = await client.upload("endless.pdf", _endless_pdf())

            async def parsing() -> bool:
                return bool(parsers._busy)

            await eventually(parsing)
            (child,) = parsers._busy
            assert _alive(child.pid)
            await client.call("DeleteDocument", document_id=hostile.document.id)
            # The delete returns once the work stopped: its parser is gone, not left running.
            assert not _alive(child.pid)
            good = await client.ingest("good.txt", GOOD)
            assert good.status == READY, good.error
    finally:
        await app.server.stop(0)
        await app.close()


def _cpu_ticks(pid: int) -> int:
    """The process's user and system time so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _killed(pid: int) -> None:
    """SIGKILL, then block (the event loop with it) until the process is gone, so the pool
    has had no chance to see it end."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(1000):
        if not _alive(pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} outlived SIGKILL")


async def test_an_idle_parser_killed_between_documents_is_replaced(
    make_settings, tmp_path, new_client
):
    settings = make_settings(tmp_path, workers=1)
    app = await start(settings)
    parsers = app.workers._parsers
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            first = await client.ingest("first.txt", GOOD)
            assert first.status == READY, first.error
            (child,) = parsers._idle
            # What the OOM killer or a stray signal does to a child waiting for work.
            _killed(child.pid)
            later = b"The next document, read by a fresh parser process."
            document = await client.ingest("next.txt", later)
            assert document.status == READY, document.error
            text = await client.call("GetDocumentText", document_id=document.id)
            assert text.text == later.decode()
            (replacement,) = parsers._idle
            assert replacement.pid != child.pid
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_dead_child_the_pool_hands_out_is_replaced_before_the_file_is_read(
    make_settings, tmp_path
):
    app = await start(make_settings(tmp_path, workers=1))
    parsers = app.workers._parsers
    path = tmp_path / "note.txt"
    path.write_text("A note parsed after its parser process died.")
    try:
        await parsers.parse(path, TEXT)
        (child,) = parsers._idle
        _killed(child.pid)
        # The loop has not run since the kill: the pool still takes the child for alive,
        # and only the child's silence tells it that it never read the request.
        assert child.returncode is None
        document = await parsers.parse(path, TEXT)
        assert document.text == "A note parsed after its parser process died."
        assert child.returncode == -signal.SIGKILL
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_parser_killed_while_it_reads_a_file_fails_that_file_once(
    make_settings, tmp_path, new_client, eventually
):
    # A file that kills its parser is never read again: were it retried, the endless PDF
    # would run into the time limit and fail with that reason instead.
    settings = make_settings(tmp_path, workers=1, parse_timeout_seconds=120)
    app = await start(settings)
    parsers = app.workers._parsers
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            hostile = await client.upload("endless.pdf", _endless_pdf())

            async def parsing() -> bool:
                return bool(parsers._busy)

            await eventually(parsing)
            (child,) = parsers._busy
            started = _cpu_ticks(child.pid)

            async def reading() -> bool:
                # The child answers that it has the request before it opens the file, so
                # half a second of work means the file, not an idle child, is being killed.
                return _cpu_ticks(child.pid) > started + os.sysconf("SC_CLK_TCK") // 2

            await eventually(reading)
            _killed(child.pid)
            states = await client.watch(hostile.document.id)
            assert states[-1].status == FAILED
            assert "parser process stopped (signal SIGKILL) while reading the file" in (
                states[-1].error
            )
            good = await client.ingest("good.txt", GOOD)
            assert good.status == READY, good.error
    finally:
        await app.server.stop(0)
        await app.close()


async def test_markdown_headings_with_long_runs_of_spaces_parse(
    make_settings, tmp_path, new_client
):
    # About 1 MB: a heading pattern that backtracks (the text, then optional spaces, #s and
    # spaces to the end) needs hours on one such line, and would FAIL at the time limit.
    gap = " " * 330_000
    data = (
        f"# Backups{gap}nightly\n\nThe copies are checked every morning.\n\n"
        f"## Restore{gap}drills ##\n\nRestores are rehearsed{gap}monthly.\n"
    ).encode()
    assert len(data) > 990_000
    settings = make_settings(tmp_path, workers=1, parse_timeout_seconds=60)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            document = await client.ingest("runbook.md", data)
            assert document.status == READY, document.error
            text = (await client.call("GetDocumentText", document_id=document.id)).text
            assert (
                text.split()
                == (
                    "Backups nightly The copies are checked every morning. "
                    "Restore drills Restores are rehearsed monthly."
                ).split()
            )
            reply = await client.call("ListChunks", document_id=document.id, page_size=1000)
            headings = {chunk.heading for chunk in reply.chunks}
            assert {"Backups nightly", "Backups nightly > Restore drills"} <= headings
    finally:
        await app.server.stop(0)
        await app.close()
