"""The ragmesh command: global options, the command groups, and how a run ends (exit status
0 when it worked, 1 when it failed, 2 for a usage error, 130 when interrupted)."""

import sys
from typing import Annotated

import grpc
import typer

from services.cli import docs, models, sessions, status
from services.cli.mesh import PORTS, CliError, Mesh, parse_targets
from services.cli.output import JsonFlag, error

app = typer.Typer(
    name="ragmesh",
    help="Talk to a running ragmesh: documents, chat, sessions, models and the mesh's health.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(docs.app, name="docs")
app.add_typer(sessions.app, name="sessions")
app.add_typer(models.app, name="models")
app.command()(sessions.chat)
app.command()(status.status)

DEFAULT_PORTS = ", ".join(f"{name} {port}" for name, port in PORTS.items())


@app.callback()
def _options(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Option(
            envvar="RAGMESH_HOST", help=f"The host of every service, on its port ({DEFAULT_PORTS})."
        ),
    ] = "localhost",
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            metavar="SERVICE=HOST:PORT",
            help="Where one service is, over --host (repeatable).",
        ),
    ] = None,
    api_key: Annotated[
        str,
        typer.Option(
            envvar="RAGMESH_API_KEY",
            show_default=False,
            help="Sent as 'authorization: Bearer <key>' on every call.",
        ),
    ] = "",
    json_: JsonFlag = False,
) -> None:
    mesh: Mesh = ctx.obj
    try:
        mesh.targets = parse_targets(host, target or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target") from exc
    mesh.api_key = api_key
    mesh.json = json_
    ctx.call_on_close(mesh.close)


def main() -> None:
    mesh = Mesh()
    try:
        code = app(obj=mesh, prog_name="ragmesh", standalone_mode=False)
    except typer.TyperException as exc:
        # Usage errors (exit status 2) name the command whose help explains it.
        context = getattr(exc, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context and exc.exit_code == 2 else ""
        error(f"{exc.format_message()}{hint}")
        code = exc.exit_code
    except grpc.RpcError as exc:
        error(mesh.explain(exc))
        code = 1
    except CliError as exc:
        error(str(exc))
        code = 1
    except Exception as exc:  # a bug: still one line, never a traceback
        error(f"unexpected {type(exc).__name__}: {exc}")
        code = 1
    sys.exit(code or 0)
