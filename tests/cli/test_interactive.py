"""ragmesh chat on a terminal, as a person uses it: a question, the answer as it streams
with its citations, Ctrl-C to stop an answer, Ctrl-D or /quit to leave."""

import asyncio
import re

SESSION = r"session ([0-9a-f-]{36})\n"


async def test_a_question_is_answered_with_citations_and_ctrl_d_leaves(cli, lighthouse):
    terminal = await cli.terminal("chat", "--doc", lighthouse, "--max-tokens", "16")
    await terminal.expect("new session")
    await terminal.prompt()
    terminal.type("Who keeps the lighthouse?\r")
    await terminal.expect(SESSION)
    await terminal.expect(r"\[D1\] skerry-light\.md")
    await terminal.expect(r"\d+ tokens")
    await terminal.prompt()
    # Ctrl-C at the prompt does not end the chat.
    terminal.type("\x03")
    await terminal.expect(r"\(/quit or Ctrl-D to leave\)")
    await terminal.prompt()
    terminal.type("\x04")
    assert await terminal.exit_code() == 0


async def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(cli, lighthouse):
    terminal = await cli.terminal("chat", "--doc", lighthouse, "--max-tokens", "400")
    await terminal.prompt()
    terminal.type("Tell me a long story about the keeper of the Skerry Light.\r")
    session_id = (await terminal.expect(SESSION)).group(1)
    await terminal.expect(r"\w{4}")  # the answer is coming
    terminal.type("\x03")
    await terminal.expect(r"\(answer cancelled\)")
    await terminal.prompt()
    terminal.type("/quit\r")
    assert await terminal.exit_code() == 0

    # The service kept what was said before Ctrl-C, as a cancelled answer.
    while True:
        messages = (await cli("sessions", "messages", session_id, "--json")).json()["messages"]
        if len(messages) == 2:
            break
        await asyncio.sleep(0.2)
    answer = messages[-1]
    assert answer["finishReason"] == "FINISH_REASON_CANCELLED"
    assert answer["completionTokens"] < 400
    assert re.search(r"\w", answer["content"])
