"""Parsing in child processes with a wall-clock limit and a memory cap, so a hostile file
that hangs a parser or balloons its memory costs one killed child and a FAILED document,
never the service or the other documents.

Each child is a warm `python -m services.ingest.parse_process <memory bytes> <pid>`, its
address space capped with RLIMIT_AS, that answers one parse after another on its stdin
and stdout: an 8-byte length, then JSON (never pickle: the child reads hostile files). The
child says when it has a request, before it opens the file, so a child that died idle (the
OOM killer, a stray signal) is told from one the file killed: the first file goes to a
fresh child, the second fails. A child that overruns its time is killed; one that ran out
of memory, or died, is replaced.
"""

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import struct
import sys
from pathlib import Path

from services.ingest.parsers import ParsedDocument, ParseError, Span, parse

_LOGGER = logging.getLogger(__name__)
_LENGTH = struct.Struct(">Q")
# Starting a child (the interpreter and the parsers' imports) is not parsing: it has a
# limit of its own, which only a machine in trouble reaches.
_START_SECONDS = 120.0
_PR_SET_PDEATHSIG = 1
_SIGNALS = frozenset(signal.Signals)


class ParserProcesses:
    """Parses uploads in warm children, one per concurrent parse (idle ones are reused)."""

    def __init__(
        self, *, timeout: float, memory_bytes: int, max_docx_bytes: int, max_chars: int
    ) -> None:
        self._timeout = timeout
        self._memory_bytes = memory_bytes
        self._limits = {"max_docx_bytes": max_docx_bytes, "max_chars": max_chars}
        self._idle: list[asyncio.subprocess.Process] = []
        self._busy: set[asyncio.subprocess.Process] = set()

    async def parse(self, path: Path, mime_type: str) -> ParsedDocument:
        """The parsed document, or ParseError saying why not (a limit, with its value)."""
        try:
            return await self._parse(await self._take(), path, mime_type)
        except _DiedIdle as death:
            # Not this file's doing: the child was gone before it read the request.
            _LOGGER.warning("an idle parser process had stopped with %s; starting another", death)
        try:
            return await self._parse(await self._start(), path, mime_type)
        except _DiedIdle as death:
            raise ParseError(
                f"a fresh parser process stopped ({death}) before reading the file too"
            ) from None

    async def _parse(
        self, child: asyncio.subprocess.Process, path: Path, mime_type: str
    ) -> ParsedDocument:
        self._busy.add(child)
        reusable = False
        reading = False
        try:
            try:
                await _send(child, {"path": str(path), "mime_type": mime_type, **self._limits})
                async with asyncio.timeout(self._timeout):
                    await _receive(child)
                    reading = True
                    reply = await _receive(child)
            except TimeoutError:
                raise ParseError(
                    f"parsing took longer than the limit of {self._timeout:g} s "
                    "(RAGMESH_INGEST_PARSE_TIMEOUT_SECONDS) and was stopped"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError):
                how = await _how_it_stopped(child)
                if not reading:
                    raise _DiedIdle(how) from None
                _LOGGER.warning("a parser process stopped with %s", how)
                raise ParseError(
                    f"the parser process stopped ({how}) while reading the file; its memory "
                    f"limit is {_mib(self._memory_bytes)} (RAGMESH_INGEST_PARSE_MEMORY_BYTES)"
                ) from None
            if reply.get("memory"):
                raise ParseError(
                    f"parsing needed more memory than the limit of {_mib(self._memory_bytes)} "
                    "(RAGMESH_INGEST_PARSE_MEMORY_BYTES) and was stopped"
                )
            reusable = True
            if "error" in reply:
                raise ParseError(reply["error"])
            return ParsedDocument(
                reply["text"], reply["page_count"], [Span(*span) for span in reply["spans"]]
            )
        finally:
            self._busy.discard(child)
            if reusable:
                self._idle.append(child)
            else:
                # Timed out, out of memory, dead, or its caller gave up (the document was
                # deleted): its next answer would be this file's, so it goes.
                await _kill(child)

    async def close(self) -> None:
        children = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(_kill(child) for child in children))

    async def _take(self) -> asyncio.subprocess.Process:
        """An idle child still alive (the kernel may have ended one meanwhile), or a new one."""
        while self._idle:
            child = self._idle.pop()
            if child.returncode is None:
                return child
        return await self._start()

    async def _start(self) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.ingest.parse_process",
            str(self._memory_bytes),
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(_START_SECONDS):
                await _receive(child)
        except BaseException:
            await _kill(child)
            raise
        return child


class _DiedIdle(Exception):
    """The child stopped before it read the request (its message says how)."""


async def _how_it_stopped(child: asyncio.subprocess.Process) -> str:
    code = await child.wait()
    if code >= 0:
        return f"exit status {code}"
    return f"signal {signal.Signals(-code).name if -code in _SIGNALS else -code}"


def _mib(count: int) -> str:
    return f"{count / 2**20:g} MiB"


async def _send(child: asyncio.subprocess.Process, message: dict) -> None:
    data = json.dumps(message).encode()
    child.stdin.write(_LENGTH.pack(len(data)) + data)
    await child.stdin.drain()


async def _receive(child: asyncio.subprocess.Process) -> dict:
    (length,) = _LENGTH.unpack(await child.stdout.readexactly(_LENGTH.size))
    return json.loads((await child.stdout.readexactly(length)).decode("utf-8", "surrogatepass"))


async def _kill(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    await child.wait()


# The child's side.


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether the failure came from an allocation that the memory cap refused."""
    while exc is not None:
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _answer(request: dict) -> dict:
    try:
        document = parse(
            Path(request["path"]),
            request["mime_type"],
            max_docx_bytes=request["max_docx_bytes"],
            max_chars=request["max_chars"],
        )
    except (ParseError, MemoryError) as exc:
        if _out_of_memory(exc):
            return {"memory": True}
        return {"error": str(exc)}
    spans = [[s.start, s.end, s.page, s.level, s.heading] for s in document.spans]
    return {"text": document.text, "page_count": document.page_count, "spans": spans}


def _serve(memory_bytes: int, parent: int) -> None:
    # Killed with the service (kill -9 included), not left parsing a hostile file for hours.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the service was gone before the line above
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # The answers get a descriptor of their own: whatever a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    # Import the parsers' libraries now, so the first file's time limit is all parsing.
    import bs4  # noqa: F401
    import lxml.etree  # noqa: F401
    import pypdf  # noqa: F401

    def write(message: dict) -> None:
        data = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
        replies.write(_LENGTH.pack(len(data)) + data)
        replies.flush()

    write({"ready": True})
    while header := requests.read(_LENGTH.size):
        (length,) = _LENGTH.unpack(header)
        request = json.loads(requests.read(length))
        write({"reading": True})
        write(_answer(request))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
