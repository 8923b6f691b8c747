"""ragmesh docs: upload, list, read, search and delete documents (the ingest service)."""

import os
import re
import threading
import unicodedata
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO

import grpc
import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.text import Text

from ragmesh.ingest.v1 import ingest_pb2
from services.cli.mesh import CliError
from services.cli.output import (
    JsonFlag,
    add_row,
    all_pages,
    console,
    enum_name,
    fields,
    print_json,
    size,
    table,
    to_dict,
    when,
)
from services.common.text import Analyzer

app = typer.Typer(
    help="Documents: upload, list, read, search and delete (the ingest service).",
)

# Bytes per upload message (the service takes up to 4 MiB each).
CHUNK_BYTES = 256 * 1024
# Documents watched at once while a folder uploads.
MAX_WATCHES = 8
Status = StrEnum(
    "Status",
    [
        (name, name)
        for name in (
            key.removeprefix("DOCUMENT_STATUS_").lower() for key in ingest_pb2.DocumentStatus.keys()
        )
        if name != "unspecified"
    ],
)


class Mode(StrEnum):
    hybrid = "hybrid"
    keyword = "keyword"
    semantic = "semantic"


MODES = {
    Mode.hybrid: ingest_pb2.SEARCH_MODE_HYBRID,
    Mode.keyword: ingest_pb2.SEARCH_MODE_KEYWORD,
    Mode.semantic: ingest_pb2.SEARCH_MODE_SEMANTIC,
}
STATUS_STYLES = {"READY": "green", "FAILED": "red"}
# The service's own word analysis, so the words highlighted are the ones that matched.
ANALYZER = Analyzer()
SNIPPET_CHARS = 300

DocumentId = Annotated[
    str, typer.Argument(metavar="ID", help="A document id (see `ragmesh docs list`).")
]


def _status(document: ingest_pb2.Document) -> str:
    return enum_name(ingest_pb2.DocumentStatus, document.status, "DOCUMENT_STATUS_")


# upload


class _Upload:
    """One file on its way in: sent, then watched until READY or FAILED."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.document: ingest_pb2.Document | None = None
        self.duplicate = False
        self.refused = ""
        self.failure: grpc.RpcError | None = None

    def to_json(self) -> dict:
        if self.document is None:
            return {"filename": self.name, "error": self.refused}
        return {"document": to_dict(self.document), "duplicate": self.duplicate}

    @property
    def failed(self) -> str:
        """Why this file did not become searchable; empty when it did."""
        if self.refused:
            return self.refused
        if self.document is not None and self.document.status == ingest_pb2.DOCUMENT_STATUS_FAILED:
            return self.document.error or "processing failed"
        return ""


def _files(paths: list[Path]) -> list[_Upload]:
    """The files named, and those under the folders named, hidden ones left out."""
    found = []
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                    found.append(_Upload(file, relative.as_posix()))
        else:
            found.append(_Upload(path, path.name))
    if not found:
        raise CliError(f"no files to upload in {', '.join(str(path) for path in paths)}")
    return found


def _requests(upload: _Upload, handle: BinaryIO, tags: list[str], sent):
    yield ingest_pb2.UploadDocumentRequest(
        metadata=ingest_pb2.DocumentMetadata(filename=upload.name, tags=tags)
    )
    while data := handle.read(CHUNK_BYTES):
        yield ingest_pb2.UploadDocumentRequest(data=data)
        sent(len(data))


class _Watcher(threading.Thread):
    """Follows one document's processing. A daemon, so Ctrl-C never waits for it."""

    def __init__(self, stub, upload: _Upload, limit: threading.Semaphore, changed) -> None:
        super().__init__(daemon=True)
        self._stub = stub
        self._upload = upload
        self._limit = limit
        self._changed = changed

    def run(self) -> None:
        upload = self._upload
        try:
            with self._limit:
                request = ingest_pb2.WatchDocumentRequest(document_id=upload.document.id)
                for reply in self._stub.WatchDocument(request):
                    upload.document = reply.document
                    self._changed(upload)
        except grpc.RpcError as exc:
            upload.failure = exc


def _upload_all(stub, uploads: list[_Upload], tags: list[str], sent, changed) -> None:
    """Sends the files one after another and watches each as soon as it is stored.
    A file the service refuses (empty, too large) is marked and the others go on."""
    limit = threading.Semaphore(MAX_WATCHES)
    watchers = []
    for upload in uploads:
        try:
            handle = upload.path.open("rb")
        except OSError as exc:
            raise CliError(f"cannot read {upload.path}: {exc.strerror}") from exc
        with handle:
            try:
                answer = stub.UploadDocument(
                    _requests(upload, handle, tags, lambda count, u=upload: sent(u, count))
                )
            except grpc.RpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ):
                    raise
                upload.refused = exc.details() or exc.code().name
                changed(upload)
                continue
        upload.document, upload.duplicate = answer.document, answer.duplicate
        changed(upload)
        watcher = _Watcher(stub, upload, limit, changed)
        watcher.start()
        watchers.append(watcher)
    for watcher in watchers:
        watcher.join()
    for upload in uploads:
        if upload.failure is not None:
            raise upload.failure


def _state(upload: _Upload) -> str:
    """The progress row's last column, as Rich markup."""
    if upload.refused:
        return f"[red]REFUSED[/] · {escape(upload.refused)}"
    document = upload.document
    if document is None:
        return "[dim]uploading[/]"
    status = _status(document)
    parts = [f"[{STATUS_STYLES.get(status, 'yellow')}]{status}[/]"]
    if document.page_count:
        parts.append(f"{document.page_count} pages")
    if document.chunk_count:
        parts.append(f"{document.chunk_count} chunks")
    if upload.duplicate:
        parts.append("already stored")
    if document.error:
        parts.append(escape(document.error))
    return " · ".join(parts)


@app.command()
def upload(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH",
            exists=True,
            readable=True,
            help="Files and folders; folders are read recursively, hidden files left out.",
        ),
    ],
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag every document (repeatable).")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Upload documents and follow their processing until they are searchable."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    uploads = _files(paths)
    tags = list(tag or [])
    if json_ or mesh.json:
        _upload_all(stub, uploads, tags, lambda upload, count: None, lambda upload: None)
        print_json([upload.to_json() for upload in uploads])
    else:
        progress = Progress(
            TextColumn("{task.fields[name]}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[id]}", style="dim", markup=False),
            TextColumn("{task.fields[state]}"),
            console=console,
        )
        with progress:
            tasks = {
                id(upload): progress.add_task(
                    "",
                    total=os.path.getsize(upload.path),
                    name=upload.name,
                    id="",
                    state=_state(upload),
                )
                for upload in uploads
            }

            def changed(upload: _Upload) -> None:
                # Redrawn at once: every state shows, however short it lasts.
                progress.update(
                    tasks[id(upload)],
                    id=upload.document.id if upload.document else "",
                    state=_state(upload),
                    refresh=True,
                )

            _upload_all(
                stub,
                uploads,
                tags,
                lambda upload, count: progress.advance(tasks[id(upload)], count),
                changed,
            )
    failed = [upload for upload in uploads if upload.failed]
    if failed:
        reasons = "; ".join(f"{upload.name}: {upload.failed}" for upload in failed)
        raise CliError(f"{len(failed)} of {len(uploads)} documents failed ({reasons})")


# reading


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        Status | None, typer.Option(case_sensitive=False, help="Only documents in this status.")
    ] = None,
    tag: Annotated[str, typer.Option(help="Only documents carrying this tag.")] = "",
    json_: JsonFlag = False,
) -> None:
    """List your documents, newest first."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    request = ingest_pb2.ListDocumentsRequest(
        page_size=500,
        tag=tag,
        status=ingest_pb2.DocumentStatus.Value(f"DOCUMENT_STATUS_{status.upper()}")
        if status
        else ingest_pb2.DOCUMENT_STATUS_UNSPECIFIED,
    )
    documents = all_pages(stub.ListDocuments, request, "documents")
    if json_ or mesh.json:
        print_json({"documents": [to_dict(document) for document in documents]})
        return
    if not documents:
        console.print("no documents")
        return
    grid = table("ID", "FILE", "STATUS", "SIZE", "CHUNKS", "TAGS", "UPDATED")
    for document in documents:
        add_row(
            grid,
            document.id,
            document.filename,
            _status(document),
            size(document.size_bytes),
            str(document.chunk_count),
            ", ".join(document.tags),
            when(document.update_time),
        )
    console.print(grid)


@app.command()
def show(ctx: typer.Context, document_id: DocumentId, json_: JsonFlag = False) -> None:
    """Show one document."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    document = stub.GetDocument(ingest_pb2.GetDocumentRequest(document_id=document_id)).document
    if json_ or mesh.json:
        print_json(to_dict(document))
        return
    rows = [
        ("id", document.id),
        ("file", document.filename),
        ("type", document.mime_type),
        ("size", size(document.size_bytes)),
        ("sha256", document.sha256),
        ("status", _status(document)),
    ]
    if document.error:
        rows.append(("error", document.error))
    if document.page_count:
        rows.append(("pages", str(document.page_count)))
    rows += [
        ("chunks", str(document.chunk_count)),
        ("tags", ", ".join(document.tags)),
        *((f"attribute {key}", value) for key, value in sorted(document.attributes.items())),
        ("created", when(document.create_time)),
        ("updated", when(document.update_time)),
    ]
    console.print(fields(rows))


@app.command()
def text(ctx: typer.Context, document_id: DocumentId, json_: JsonFlag = False) -> None:
    """Print a document's parsed text."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    parts, start = [], 0
    while True:
        reply = stub.GetDocumentText(
            ingest_pb2.GetDocumentTextRequest(document_id=document_id, start=start)
        )
        parts.append(reply.text)
        if reply.end >= reply.total_chars:
            break
        start = reply.end
    whole = "".join(parts)
    if json_ or mesh.json:
        print_json(
            to_dict(
                ingest_pb2.GetDocumentTextResponse(
                    text=whole, total_chars=reply.total_chars, start=0, end=reply.total_chars
                )
            )
        )
        return
    console.file.write(whole)
    console.file.flush()


@app.command()
def chunks(ctx: typer.Context, document_id: DocumentId, json_: JsonFlag = False) -> None:
    """Print a document's chunks in order, with their pages, tokens and headings."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    found = all_pages(
        stub.ListChunks,
        ingest_pb2.ListChunksRequest(document_id=document_id, page_size=1000),
        "chunks",
    )
    if json_ or mesh.json:
        print_json({"chunks": [to_dict(chunk) for chunk in found]})
        return
    for chunk in found:
        about = [f"{chunk.token_count} tokens", f"chars {chunk.start_char}-{chunk.end_char}"]
        if chunk.page:
            about.insert(0, f"page {chunk.page}")
        if chunk.heading:
            about.append(chunk.heading)
        console.print(Text.assemble((f"#{chunk.index}", "bold"), (f"  {' · '.join(about)}", "dim")))
        console.print(Text(chunk.text), end="\n\n")


@app.command("rm")
def remove(
    ctx: typer.Context,
    document_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Document ids.")],
    json_: JsonFlag = False,
) -> None:
    """Delete documents: their text, chunks, vectors and stored bytes."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    for document_id in document_ids:
        stub.DeleteDocument(ingest_pb2.DeleteDocumentRequest(document_id=document_id))
        if not (json_ or mesh.json):
            console.print(Text(f"deleted {document_id}"))
    if json_ or mesh.json:
        print_json({"deleted": document_ids})


# search


def highlight(text: str, terms: list[str]) -> Text:
    """A snippet of text around the first matched term, every matched word in bold:
    words are compared by stem, as the service's keyword search compares them."""
    text = " ".join(text.split())
    stems = {ANALYZER.stem(unicodedata.normalize("NFKC", term).casefold()) for term in terms}
    spans = [
        match.span()
        for match in re.finditer(r"\w+", text)
        if ANALYZER.stem(unicodedata.normalize("NFKC", match.group()).casefold()) in stems
    ]
    start = max(0, spans[0][0] - SNIPPET_CHARS // 4) if spans else 0
    end = min(len(text), start + SNIPPET_CHARS)
    snippet = Text(("…" if start else "") + text[start:end] + ("…" if end < len(text) else ""))
    shift = 1 if start else 0
    for first, last in spans:
        if first >= start and last <= end:
            snippet.stylize("bold yellow", first - start + shift, last - start + shift)
    return snippet


def _channel(channel: ingest_pb2.ChannelScore) -> str:
    return f"{channel.score:.3f} #{channel.rank}" if channel.rank else "—"


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(metavar="QUERY", help="What to look for; no operators.")],
    mode: Annotated[
        Mode,
        typer.Option(
            case_sensitive=False,
            help="keyword (BM25), semantic (embeddings) or hybrid (both, fused).",
        ),
    ] = Mode.hybrid,
    doc: Annotated[
        list[str] | None, typer.Option("--doc", help="Only this document (repeatable).")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only documents with this tag (repeatable).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="How many hits, 1-100.")] = 10,
    json_: JsonFlag = False,
) -> None:
    """Search your documents' chunks."""
    mesh = ctx.obj
    stub = mesh.stub("ingest")
    reply = stub.Search(
        ingest_pb2.SearchRequest(
            query=query,
            mode=MODES[mode],
            top_k=top_k,
            filter=ingest_pb2.SearchFilter(document_ids=doc or [], tags=tag or []),
        )
    )
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    used = enum_name(ingest_pb2.SearchMode, reply.mode, "SEARCH_MODE_").lower()
    if not reply.hits:
        console.print(f"no hits ({used} search)")
        return
    keyword = reply.mode != ingest_pb2.SEARCH_MODE_SEMANTIC
    semantic = reply.mode != ingest_pb2.SEARCH_MODE_KEYWORD
    columns = ["#", "SCORE", *(["KEYWORD"] if keyword else []), *(["SEMANTIC"] if semantic else [])]
    grid = table(*columns, "DOCUMENT", "TEXT", title=f"{used} search", title_justify="left")
    for rank, hit in enumerate(reply.hits, 1):
        where = f"{hit.filename} #{hit.chunk_index}" + (f" p.{hit.page}" if hit.page else "")
        channels = [
            *([_channel(hit.keyword)] if keyword else []),
            *([_channel(hit.semantic)] if semantic else []),
        ]
        add_row(
            grid,
            str(rank),
            f"{hit.score:.3f}",
            *channels,
            where,
            highlight(hit.text, list(hit.matched_terms)),
        )
    console.print(grid)
