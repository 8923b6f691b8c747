"""ragmesh chat -m and ragmesh sessions against the real mesh: one-shot answers with their
citations, continuing a session, finding and deleting it."""

import re

SESSION = re.compile(r"session ([0-9a-f-]{36})")


async def test_one_shot_chat_streams_an_answer_with_its_citations(cli, lighthouse):
    run = await cli(
        "chat", "--doc", lighthouse, "-m", "Who keeps the lighthouse?", "--max-tokens", "16"
    )
    assert run.code == 0, run.err
    assert "[D1] skerry-light.md" in run.out
    session_id = SESSION.search(run.out).group(1)

    session = (await cli("sessions", "show", session_id, "--json")).json()
    assert session["documentIds"] == [lighthouse]
    assert session["messageCount"] == 2
    conversation = await cli("sessions", "messages", session_id)
    assert "Who keeps the lighthouse?" in conversation.out
    assert "[D1] skerry-light.md" in conversation.out


async def test_a_session_goes_on_and_scripts_read_the_exchange_as_json(cli, lighthouse):
    first = await cli(
        "chat", "--doc", lighthouse, "-m", "How many steps has the tower?", "--max-tokens", "16"
    )
    session_id = SESSION.search(first.out).group(1)

    run = await cli(
        "chat", session_id, "-m", "Where was the lens ground?", "--max-tokens", "16", "--json"
    )
    assert run.code == 0, run.err
    exchange = run.json()
    assert exchange["userMessage"]["content"] == "Where was the lens ground?"
    answer = exchange["assistantMessage"]
    assert answer["sessionId"] == session_id
    assert answer["role"] == "MESSAGE_ROLE_ASSISTANT"
    assert answer["content"]
    assert answer["completionTokens"] <= 16
    assert {c["filename"] for c in answer["citations"]} == {"skerry-light.md"}
    assert exchange["retrieval"]["hits"]

    messages = (await cli("sessions", "messages", session_id, "--json")).json()["messages"]
    assert [m["role"] for m in messages] == [
        "MESSAGE_ROLE_USER",
        "MESSAGE_ROLE_ASSISTANT",
    ] * 2


async def test_sessions_are_listed_found_by_name_and_deleted(cli, lighthouse):
    run = await cli(
        "chat",
        "--doc",
        lighthouse,
        "--name",
        "Fresnel lens questions",
        "-m",
        "What kind of lens turns in the tower?",
        "--max-tokens",
        "16",
    )
    session_id = SESSION.search(run.out).group(1)

    listed = await cli("sessions", "list")
    assert session_id in listed.out and "Fresnel lens questions" in listed.out
    sessions = (await cli("sessions", "list", "--json")).json()["sessions"]
    assert session_id in {session["id"] for session in sessions}

    found = (await cli("sessions", "search", "fresnel", "--json")).json()["matches"]
    match = next(m for m in found if m["session"]["id"] == session_id)
    assert "name" in match["matchedFields"]
    assert session_id in (await cli("sessions", "search", "fresnel")).out

    removed = await cli("sessions", "rm", session_id)
    assert removed.code == 0 and f"deleted {session_id}" in removed.out
    gone = await cli("sessions", "show", session_id)
    assert gone.code == 1
    assert gone.err == f"error: no session {session_id}\n"
