"""What the CLI prints: Rich for people, JSON for scripts, errors as one line."""

import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON (the protobuf JSON mapping).")
]


def to_dict(message) -> dict:
    """The protobuf JSON mapping, with every field present so scripts can rely on keys."""
    return MessageToDict(message, always_print_fields_with_no_presence=True)


def print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    errors.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())), soft_wrap=True)


def all_pages(method: Callable, request, field: str) -> list:
    """Every item of a paged List call, following next_page_token."""
    items = []
    while True:
        reply = method(request)
        items.extend(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token


def enum_name(enum, value: int, prefix: str) -> str:
    """An enum value's name without its prefix, for example READY for DOCUMENT_STATUS_READY."""
    return enum.Name(value).removeprefix(prefix)


def size(count: float) -> str:
    """Bytes in binary units, for example 1.5 GiB."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} TiB"


def when(timestamp) -> str:
    """A protobuf Timestamp in local time; empty when unset."""
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fields(rows: Iterable[tuple[str, RenderableType | str]]) -> Table:
    """A two-column grid of names and values; plain strings are shown as they are."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        add_row(grid, name, value)
    return grid


def add_row(grid: Table, *cells: RenderableType | str) -> None:
    """A row whose plain strings are shown as they are (never read as Rich markup)."""
    grid.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells))


def table(*columns: str, **options) -> Table:
    result = Table(box=None, header_style="bold", pad_edge=False, **options)
    for column in columns:
        if column == "ID":
            # Ids are copied into other commands: never wrapped or cut.
            result.add_column(column, no_wrap=True, min_width=36)
        else:
            result.add_column(column)
    return result
