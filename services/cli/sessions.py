"""ragmesh chat and ragmesh sessions: conversations over your documents (the sessions
service)."""

from typing import Annotated

import grpc
import typer
from rich.text import Text

from ragmesh.llm.v1 import llm_pb2
from ragmesh.sessions.v1 import sessions_pb2
from services.cli.mesh import Mesh
from services.cli.output import (
    JsonFlag,
    add_row,
    all_pages,
    console,
    enum_name,
    error,
    fields,
    print_json,
    table,
    to_dict,
    when,
)

app = typer.Typer(
    help="Chat sessions: list, show, search, delete, read (the sessions service).",
)

PROMPT = "[bold cyan]>[/] "
QUIT = "/quit"
# Retrieval skips that only say there was nothing to look in; others are worth a note.
QUIET_SKIPS = {"NO_DOCUMENTS", "NO_MEMORIES", "DISABLED"}
FINISHED = {
    "LENGTH": "stopped at the token limit",
    "CANCELLED": "cancelled",
    "ERROR": "failed",
}

SessionId = Annotated[
    str, typer.Argument(metavar="ID", help="A session id (see `ragmesh sessions list`).")
]


def _finish(message: sessions_pb2.Message) -> str:
    return enum_name(sessions_pb2.FinishReason, message.finish_reason, "FINISH_REASON_")


def _citations(message: sessions_pb2.Message) -> None:
    for number, citation in enumerate(message.citations, 1):
        where = citation.filename + (f" p.{citation.page}" if citation.page else "")
        console.print(Text(f"  [D{number}] {where} · {citation.score:.3f}", style="cyan"))


class Conversation:
    """A session being talked to: created with the first question when it is new."""

    def __init__(
        self,
        stub,
        session: sessions_pb2.Session | None,
        documents: list[str],
        name: str,
        max_tokens: int | None,
        announce: bool = False,
    ) -> None:
        self._stub = stub
        self._announce = announce
        self.session = session
        self._documents = documents
        self._name = name
        self._overrides = llm_pb2.GenerationOverrides(max_new_tokens=max_tokens)

    def _session_id(self) -> str:
        if self.session is None:
            self.session = self._stub.CreateSession(
                sessions_pb2.CreateSessionRequest(name=self._name, document_ids=self._documents)
            ).session
            # The documents became the session's own.
            self._documents = []
            if self._announce:
                console.print(Text(f"session {self.session.id}", style="dim"))
        return self.session.id

    def ask(self, question: str, show: bool) -> dict:
        """Sends question and returns the stream's events by kind, the answer's deltas
        printed as they come when show. Ctrl-C cancels the answer (the service keeps what
        was said, as CANCELLED) and is raised again."""
        call = self._stub.SendMessage(
            sessions_pb2.SendMessageRequest(
                session_id=self._session_id(),
                content=question,
                document_ids=self._documents,
                overrides=self._overrides,
            )
        )
        events = {}
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind != "delta":
                    events[kind] = getattr(event, kind)
                elif show:
                    console.out(event.delta, end="", highlight=False)
                if kind == "retrieval" and show:
                    for skip in event.retrieval.skipped:
                        if skip.reason not in QUIET_SKIPS:
                            console.print(Text(f"note: {skip.message}", style="yellow"))
        except KeyboardInterrupt:
            call.cancel()
            raise
        if show:
            console.print()
            answer = events["assistant_message"]
            _citations(answer)
            about = [f"session {answer.session_id}", answer.model]
            about.append(f"{answer.completion_tokens} tokens")
            finish = FINISHED.get(_finish(answer))
            if finish:
                about.append(finish)
            console.print(Text(" · ".join(about), style="dim"))
        return events


def _interactive(conversation: Conversation, mesh: Mesh) -> None:
    # Line editing and history for input().
    import readline  # noqa: F401

    session = conversation.session
    if session is None:
        console.print(Text("new session, created with your first question", style="bold"))
    else:
        console.print(
            Text(
                f"session {session.id} · {session.name or '(unnamed)'} · "
                f"{session.message_count} messages",
                style="bold",
            )
        )
    console.print(Text(f"{QUIT} or Ctrl-D to leave · Ctrl-C stops an answer", style="dim"))
    while True:
        try:
            question = console.input(PROMPT).strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print(Text(f"\n({QUIT} or Ctrl-D to leave)", style="dim"))
            continue
        if question == QUIT:
            return
        if not question:
            continue
        try:
            conversation.ask(question, show=True)
        except KeyboardInterrupt:
            console.print(Text("\n(answer cancelled)", style="yellow"))
        except grpc.RpcError as exc:
            console.print()
            error(mesh.explain(exc))


def chat(
    ctx: typer.Context,
    session_id: Annotated[
        str | None,
        typer.Argument(metavar="SESSION", help="The session to continue; a new one when left out."),
    ] = None,
    doc: Annotated[
        list[str] | None,
        typer.Option(
            "--doc",
            help="A document to answer from (repeatable): a new session's own, or for an "
            "existing session these instead of its documents.",
        ),
    ] = None,
    message: Annotated[
        str | None, typer.Option("-m", "--message", help="Ask one question and exit.")
    ] = None,
    name: Annotated[str, typer.Option(help="A new session's name.")] = "",
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="The longest answer, in tokens.")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Chat with your documents: interactive, or one question with -m."""
    mesh = ctx.obj
    as_json = json_ or mesh.json
    if as_json and message is None:
        raise typer.BadParameter("only with a question in -m", param_hint="--json")
    stub = mesh.stub("sessions")
    session = None
    if session_id is not None:
        session = stub.GetSession(sessions_pb2.GetSessionRequest(session_id=session_id)).session
    conversation = Conversation(
        stub, session, list(doc or []), name, max_tokens, announce=message is None
    )
    if message is None:
        _interactive(conversation, mesh)
        return
    events = conversation.ask(message, show=not as_json)
    if as_json:
        names = sessions_pb2.SendMessageResponse.DESCRIPTOR.fields_by_name
        print_json({names[kind].json_name: to_dict(value) for kind, value in events.items()})


@app.command("list")
def list_(
    ctx: typer.Context,
    tag: Annotated[str, typer.Option(help="Only sessions with this tag (set or automatic).")] = "",
    model: Annotated[str, typer.Option(help="Only sessions answered by this model.")] = "",
    json_: JsonFlag = False,
) -> None:
    """List your sessions, most recent exchange first."""
    mesh = ctx.obj
    stub = mesh.stub("sessions")
    found = all_pages(
        stub.ListSessions,
        sessions_pb2.ListSessionsRequest(page_size=500, tag=tag, model=model),
        "sessions",
    )
    if json_ or mesh.json:
        print_json({"sessions": [to_dict(session) for session in found]})
        return
    if not found:
        console.print("no sessions")
        return
    grid = table("ID", "NAME", "MESSAGES", "TAGS", "LAST EXCHANGE")
    for session in found:
        add_row(
            grid,
            session.id,
            session.name,
            str(session.message_count),
            ", ".join([*session.tags, *session.auto_tags]),
            when(session.last_exchange_time),
        )
    console.print(grid)


@app.command()
def show(ctx: typer.Context, session_id: SessionId, json_: JsonFlag = False) -> None:
    """Show one session."""
    mesh = ctx.obj
    stub = mesh.stub("sessions")
    session = stub.GetSession(sessions_pb2.GetSessionRequest(session_id=session_id)).session
    if json_ or mesh.json:
        print_json(to_dict(session))
        return
    generation = ", ".join(
        f"{field.name}={value}" for field, value in session.generation.ListFields()
    )
    console.print(
        fields(
            [
                ("id", session.id),
                ("name", session.name),
                ("model", session.model or "(whatever the llm service serves)"),
                ("documents", ", ".join(session.document_ids)),
                ("tags", ", ".join(session.tags)),
                ("automatic tags", ", ".join(session.auto_tags)),
                ("messages", str(session.message_count)),
                ("created", when(session.create_time)),
                ("last exchange", when(session.last_exchange_time)),
                ("system prompt", session.system_prompt),
                ("generation", generation),
            ]
        )
    )


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[
        str, typer.Argument(metavar="QUERY", help="Words of a name or tag, or what was said.")
    ],
    top_k: Annotated[int, typer.Option("--top-k", help="How many sessions, 1-100.")] = 20,
    json_: JsonFlag = False,
) -> None:
    """Find sessions by name, tags and the meaning of their exchanges."""
    mesh = ctx.obj
    stub = mesh.stub("sessions")
    reply = stub.SearchSessions(sessions_pb2.SearchSessionsRequest(query=query, top_k=top_k))
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    if not reply.matches:
        console.print("no sessions found")
        return
    grid = table("SCORE", "ID", "NAME", "MATCHED", "SNIPPET")
    for match in reply.matches:
        add_row(
            grid,
            f"{match.score:.3f}",
            match.session.id,
            match.session.name,
            ", ".join(match.matched_fields),
            " ".join(match.snippet.split()),
        )
    console.print(grid)


@app.command("rm")
def remove(
    ctx: typer.Context,
    session_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Session ids.")],
    json_: JsonFlag = False,
) -> None:
    """Delete sessions with their messages and memories."""
    mesh = ctx.obj
    stub = mesh.stub("sessions")
    for session_id in session_ids:
        stub.DeleteSession(sessions_pb2.DeleteSessionRequest(session_id=session_id))
        if not (json_ or mesh.json):
            console.print(Text(f"deleted {session_id}"))
    if json_ or mesh.json:
        print_json({"deleted": session_ids})


@app.command()
def messages(ctx: typer.Context, session_id: SessionId, json_: JsonFlag = False) -> None:
    """Print a session's conversation, oldest first, with the passages each answer cited."""
    mesh = ctx.obj
    stub = mesh.stub("sessions")
    found = all_pages(
        stub.ListMessages,
        sessions_pb2.ListMessagesRequest(session_id=session_id, page_size=1000),
        "messages",
    )
    if json_ or mesh.json:
        print_json({"messages": [to_dict(message) for message in found]})
        return
    for message in found:
        role = enum_name(sessions_pb2.MessageRole, message.role, "MESSAGE_ROLE_").lower()
        about = [role, when(message.create_time)]
        if message.role == sessions_pb2.MESSAGE_ROLE_ASSISTANT:
            about += [message.model, f"{message.completion_tokens} tokens", _finish(message)]
        console.print(Text(" · ".join(about), style="bold" if role == "user" else "dim"))
        console.print(Text(message.content))
        if message.error:
            console.print(Text(f"error: {message.error}", style="red"))
        _citations(message)
        console.print()
