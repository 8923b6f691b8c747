"""Admission by expected wait: behind a queue it cannot get through in time, a request with
a short deadline is refused at once with RESOURCE_EXHAUSTED DEADLINE_UNREACHABLE, while
one with a long deadline or none waits its turn; answers ahead that end long before their
max_new_tokens, as the finished ones did, count as short; a request whose deadline passes
in the queue leaves it without being prefilled. The packaged SmolLM2 on llama.cpp."""

import asyncio

import grpc
import pytest
from conftest import COUNTING, collect, gen_overrides
from rpc_errors import error_info

from ragmesh.llm.v1 import llm_pb2
from services.llm.batching import expected_waits
from services.llm.catalogue import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow

LONG = gen_overrides(max_new_tokens=200, temperature=0.0)
SHORT = gen_overrides(max_new_tokens=4, temperature=0.0)
# Greedy counting stopped at "12": 7 tokens (" 11, 1" and the "2"), far below its
# max_new_tokens.
EARLY = gen_overrides(max_new_tokens=2000, temperature=0.0, stop_sequences=["12"])
# A short deadline, far below the several 200-token generations ahead of it at any speed
# this model decodes on a CPU, and far above what a 4-token answer on an idle engine takes.
SHORT_DEADLINE = 2.0


async def _queued(client, depth: int, unless=None) -> None:
    """Waits until depth requests wait in the engine's queue (what the metrics report), or
    until the call unless has ended."""
    async with asyncio.timeout(60):
        # The queue lives on the decode thread: nothing to await but its figures.
        while client.app.manager.queue_figures().depth < depth:
            if unless is not None and unless.done():
                return
            await asyncio.sleep(0.02)


def _generate(client, prompt: str, overrides, **kwargs):
    request = llm_pb2.GenerateRequest(prompt=prompt, overrides=overrides)
    return client.llm.Generate(request, **kwargs)


async def test_a_request_that_cannot_meet_its_deadline_is_refused_and_others_wait_their_turn(
    make_client,
):
    client = await make_client(max_batch_size=2, max_queue=16, max_context_tokens=1024)
    assert (await client.load(DEFAULT_MODEL_NAME)).state == llm_pb2.MODEL_STATE_READY
    # One answer measures the prefill and decode rates (until then everything is admitted)
    # and how long answers run: to their max_new_tokens, as the fillers' will.
    _, completion = await collect(_generate(client, COUNTING, LONG))
    assert completion.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    fillers = [_generate(client, COUNTING, LONG) for _ in range(8)]
    await _queued(client, 6)  # two in the batch, six waiting

    chat = llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content="Say hello.")],
        overrides=SHORT,
    )
    for call in (
        _generate(client, "Hello", SHORT, timeout=SHORT_DEADLINE),
        client.llm.Chat(chat, timeout=SHORT_DEADLINE),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        info = error_info(caught.value)
        assert info.reason == "DEADLINE_UNREACHABLE"
        wait = float(info.metadata["expected_wait_seconds"])
        assert wait > float(info.metadata["deadline_seconds"])
        assert f"expected wait for a first token is {wait:.1f} s" in caught.value.details()
        assert "longer deadline" in caught.value.details()

    # A long deadline and none are admitted: both wait in the queue behind the fillers.
    patient = [
        _generate(client, "Hello", SHORT, timeout=600),
        _generate(client, "Hello", SHORT),
    ]
    await _queued(client, 8)
    for call in fillers:
        call.cancel()
    for call in patient:
        _, completion = await collect(call)
        assert completion.finish_reason in (llm_pb2.FINISH_REASON_LENGTH, llm_pb2.FINISH_REASON_EOS)

    # Drained, the short deadline is met.
    _, completion = await collect(_generate(client, "Hello", SHORT, timeout=SHORT_DEADLINE))
    assert completion.finish_reason in (llm_pb2.FINISH_REASON_LENGTH, llm_pb2.FINISH_REASON_EOS)
    assert completion.usage.completion_tokens > 0


async def test_a_request_whose_deadline_passes_in_the_queue_leaves_it_unprefilled(
    make_client, faulty_engines
):
    client = await make_client(max_context_tokens=256)
    assert (await client.load(DEFAULT_MODEL_NAME)).state == llm_pb2.MODEL_STATE_READY
    (engine,) = faulty_engines
    injector = engine.model
    prefilled: list[int] = []
    prefill = injector.prefill

    def counting(seq: int, ids: list[int], start: int = 0) -> None:
        prefilled.append(len(ids))
        prefill(seq, ids, start)

    injector.prefill = counting
    # The first prompt holds the model at the gate; nothing is measured yet, so the second
    # request is admitted and waits in the queue past its deadline.
    injector.gate.clear()
    first = _generate(client, "Once upon a time", SHORT)
    assert await asyncio.to_thread(injector.held.wait, 60)
    late = _generate(client, "A prompt that must never run", SHORT, timeout=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(late)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    injector.gate.set()
    _, completion = await collect(first)
    assert completion.usage.completion_tokens > 0
    assert sum(prefilled) == len(engine.encode("Once upon a time"))
    assert client.app.manager.queue_figures().depth == 0


async def test_a_queued_request_is_refused_once_the_measured_rates_show_it_cannot_make_it(
    make_client, faulty_engines
):
    client = await make_client(max_batch_size=1, max_queue=16, max_context_tokens=1024)
    assert (await client.load(DEFAULT_MODEL_NAME)).state == llm_pb2.MODEL_STATE_READY
    (engine,) = faulty_engines
    # Nothing is measured while the first prompt waits at the gate: all are admitted.
    engine.model.gate.clear()
    longer = gen_overrides(max_new_tokens=500, temperature=0.0)
    fillers = [_generate(client, COUNTING, longer)]
    assert await asyncio.to_thread(engine.model.held.wait, 60)
    fillers += [_generate(client, COUNTING, longer) for _ in range(8)]
    await _queued(client, 8)
    # Eight 500-token answers one after another wait ahead of it: far beyond 10 s.
    hopeless = _generate(client, "Hello", SHORT, timeout=10)
    await _queued(client, 9)
    engine.model.gate.set()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(hopeless)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert error_info(caught.value).reason == "DEADLINE_UNREACHABLE"
    for call in fillers:
        call.cancel()


async def test_answers_ahead_that_end_early_count_as_short_once_answers_have_ended_so(
    make_client, faulty_engines
):
    client = await make_client(max_batch_size=1, max_queue=16, max_context_tokens=2048)
    assert (await client.load(DEFAULT_MODEL_NAME)).state == llm_pb2.MODEL_STATE_READY
    (engine,) = faulty_engines

    async def behind_eight_early_answers(deadline: float):
        """Eight EARLY answers, one at the gate and seven queued, then a request with the
        deadline; the gate opens once that is queued (or refused). Returns the calls."""
        engine.model.held.clear()
        engine.model.gate.clear()
        fillers = [_generate(client, COUNTING, EARLY)]
        assert await asyncio.to_thread(engine.model.held.wait, 60)
        fillers += [_generate(client, COUNTING, EARLY) for _ in range(7)]
        await _queued(client, 7)
        waiting = _generate(client, "Hello", SHORT, timeout=deadline)
        await _queued(client, 8, unless=waiting)
        engine.model.gate.set()
        return fillers, waiting

    # No answer has ended yet: each ahead counts its 2,000 max_new_tokens, 16,000 steps in
    # all, and once the first round has measured the rates the queued request is refused.
    fillers, waiting = await behind_eight_early_answers(30)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(waiting)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert error_info(caught.value).reason == "DEADLINE_UNREACHABLE"
    for call in fillers:
        _, completion = await collect(call)
        assert completion.finish_reason == llm_pb2.FINISH_REASON_STOP
        assert completion.usage.completion_tokens < 20

    # Eight answers of a few tokens have ended: the same queue is a few seconds' work, and
    # the same deadline is admitted and met.
    fillers, waiting = await behind_eight_early_answers(30)
    _, completion = await collect(waiting)
    assert completion.finish_reason in (llm_pb2.FINISH_REASON_LENGTH, llm_pb2.FINISH_REASON_EOS)
    assert completion.usage.completion_tokens > 0
    for call in fillers:
        _, completion = await collect(call)
        assert completion.finish_reason == llm_pb2.FINISH_REASON_STOP


def test_the_expected_wait_plays_the_slots_and_rounds_forward():
    p, s = 0.01, 0.1  # seconds per prompt token, per decode step
    # Whole prompts (transformers): two slots free after 10 and 20 steps; the first queued
    # request prefills 100 tokens once the first frees, the second 10 once the other does.
    held = [(0, 15, 5), (0, 30, 10)]
    assert expected_waits(held, [(100, 50), (10, 5)], 2, p, s, None, None) == (
        pytest.approx([1.0 + 1.0, 2.0 + 1.0 + 0.1])
    )
    # Chunks of 10 beside running requests: each round is 10 prompt tokens and a step;
    # the joining prompt's 30 tokens go first, then the queued one's 20.
    held = [(0, 100, 0), (30, 20, 0)]
    assert expected_waits(held, [(20, 5)], 3, p, s, 10, None) == pytest.approx([5 * (10 * p + s)])
    # Nothing running: the prompt goes in at the full rate.
    assert expected_waits([], [(300, 10)], 1, p, s, 10, None) == pytest.approx([3.0])
    # One slot: each queued request waits for the whole answer of the one before it.
    assert expected_waits([(0, 5, 0)], [(10, 50)] * 2, 1, p, s, None, None) == pytest.approx(
        [0.5 + 0.1, 0.6 + 50 * s + 0.1]
    )


def test_the_expected_wait_counts_the_expected_answer_length_within_max_new_tokens():
    p, s = 0.01, 0.1
    # One slot, answers of 20 tokens expected: the running one (5 generated of 300) frees
    # it after 15 steps, the first queued one after 20 more once its 10 tokens are in.
    queued = [(10, 300)] * 2
    assert expected_waits([(0, 300, 5)], queued, 1, p, s, None, 20) == pytest.approx(
        [1.5 + 0.1, 1.6 + 2.0 + 0.1]
    )
    # With no length known each runs to its max_new_tokens: 295 steps, then 300.
    assert expected_waits([(0, 300, 5)], queued, 1, p, s, None, None) == pytest.approx(
        [29.5 + 0.1, 29.6 + 30.0 + 0.1]
    )
    # A max_new_tokens below the expected length ends the answer first: 6 more steps.
    assert expected_waits([(0, 8, 2)], [(10, 300)], 1, p, s, None, 20) == pytest.approx([0.6 + 0.1])
    # One already past the expected length is expected to end at the next step; a
    # fractional mean stands as it is (12.5 - 10 steps).
    assert expected_waits([(0, 300, 50)], [(10, 300)], 1, p, s, None, 20) == pytest.approx(
        [0.1 + 0.1]
    )
    assert expected_waits([(0, 300, 10)], [(10, 300)], 1, p, s, None, 12.5) == pytest.approx(
        [0.25 + 0.1]
    )
    # A joining request (4 tokens of prompt left, none generated) holds the slot for its
    # prefill and the expected 20 steps.
    assert expected_waits([(4, 300, 0)], [(10, 300)], 1, p, s, None, 20) == pytest.approx(
        [0.04 + 2.0 + 0.1]
    )
