"""What a person sees when something is wrong: one line on stderr, never a traceback, and
exit status 1 for a failure, 2 for a mistake in the command."""

import socket
import uuid

import pytest


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("service", "args"),
    [
        ("sessions", ["sessions", "list"]),
        ("sessions", ["chat", "-m", "Anyone there?"]),
        ("ingest", ["docs", "list"]),
        ("llm", ["models", "status"]),
        ("telemetry", ["status"]),
    ],
)
async def test_a_service_that_is_down_is_named_with_its_address(cli, service, args):
    port = _closed_port()
    run = await cli(*args, targets={**cli.targets, service: f"127.0.0.1:{port}"})
    assert run.code == 1
    assert run.err == f"error: the {service} service at 127.0.0.1:{port} is not reachable\n"
    assert run.out == ""


async def test_a_wrong_or_missing_key_is_refused_in_one_line(cli):
    wrong = await cli("--api-key", "not-a-key", "docs", "list")
    assert wrong.code == 1
    assert _one_line(wrong.err).startswith(
        f"error: the ingest service at {cli.targets['ingest']} refused the credentials "
        "(invalid credentials)"
    )
    assert "RAGMESH_API_KEY" in wrong.err

    missing = await cli("sessions", "list", env={"RAGMESH_API_KEY": None})
    assert missing.code == 1
    assert "missing credentials" in _one_line(missing.err)


async def test_an_id_that_does_not_exist_shows_the_services_message(cli):
    unknown = str(uuid.uuid4())
    for args, message in (
        (["docs", "show", unknown], f"document {unknown!r} does not exist"),
        (["docs", "text", unknown], f"document {unknown!r} does not exist"),
        (["sessions", "messages", unknown], f"no session {unknown}"),
        (["chat", unknown, "-m", "Hello?"], f"no session {unknown}"),
    ):
        run = await cli(*args)
        assert run.code == 1
        assert run.err == f"error: {message}\n"


async def test_an_invalid_argument_shows_what_the_service_refused(cli):
    run = await cli("docs", "search", "lens", "--top-k", "500")
    assert run.code == 1
    assert "top_k" in _one_line(run.err)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["docs"],
        ["docs", "show"],
        ["docs", "upload", "/no/such/file"],
        ["docs", "search", "lens", "--mode", "fuzzy"],
        ["--target", "search=localhost:1", "status"],
        ["--target", "sessions=localhost", "status"],
        ["models", "config", "--set", "warmth=1"],
        ["models", "config", "--set", "top_k=many"],
        ["chat", "--json"],
    ],
)
async def test_a_mistake_in_the_command_is_a_usage_error(cli, args):
    run = await cli(*args)
    assert run.code == 2
    assert "--help" in _one_line(run.err)
