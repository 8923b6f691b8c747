"""Admission by expected wait: behind a queue it cannot get through in time, a request with
a short deadline is refused at once with RESOURCE_EXHAUSTED DEADLINE_UNREACHABLE, while
one with a long deadline or none waits its turn; a request whose deadline passes in the
queue leaves it without being prefilled. The packaged SmolLM2 on llama.cpp."""

import asyncio

import grpc
import pytest
from conftest import collect, gen_overrides
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ragmesh.llm.v1 import llm_pb2
from services.llm.batching import expected_waits
from services.llm.catalogue import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow

# Greedy counting runs to max_new_tokens: the queue stays long while the test looks at it.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
LONG = gen_overrides(max_new_tokens=200, temperature=0.0)
SHORT = gen_overrides(max_new_tokens=4, temperature=0.0)
# A short deadline, far below the several 200-token generations ahead of it at any speed
# this model decodes on a CPU, and far above what a 4-token answer on an idle engine takes.
SHORT_DEADLINE = 2.0


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


async def _queued(client, depth: int) -> None:
    """Waits until depth requests wait in the engine's queue (what the metrics report)."""
    async with asyncio.timeout(60):
        # The queue lives on the decode thread: nothing to await but its figures.
        while client.app.manager.queue_figures().depth < depth:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _generate(client, prompt: str, overrides, **kwargs):
    request = llm_pb2.GenerateRequest(prompt=prompt, overrides=overrides)
    return client.llm.Generate(request, **kwargs)


async def test_a_request_that_cannot_meet_its_deadline_is_refused_and_others_wait_their_turn(
    make_client,
):
    client = await make_client(max_batch_size=2, max_queue=16, max_context_tokens=1024)
    assert (await client.load(DEFAULT_MODEL_NAME)).state == llm_pb2.MODEL_STATE_READY
    # One answer measures the prefill and decode rates; until then everything is admitted.
    await collect(_generate(client, "Hello", SHORT))
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
        info = _error_info(caught.value)
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
    assert _error_info(caught.value).reason == "DEADLINE_UNREACHABLE"
    for call in fillers:
        call.cancel()


def test_the_expected_wait_plays_the_slots_and_rounds_forward():
    p, s = 0.01, 0.1  # seconds per prompt token, per decode step
    # Whole prompts (transformers): two slots free after 10 and 20 steps; the first queued
    # request prefills 100 tokens once the first frees, the second 10 once the other does.
    assert expected_waits([(0, 10), (0, 20)], [(100, 50), (10, 5)], 2, p, s, None) == (
        pytest.approx([1.0 + 1.0, 2.0 + 1.0 + 0.1])
    )
    # Chunks of 10 beside running requests: each round is 10 prompt tokens and a step;
    # the joining prompt's 30 tokens go first, then the queued one's 20.
    assert expected_waits([(0, 100), (30, 20)], [(20, 5)], 3, p, s, 10) == pytest.approx(
        [5 * (10 * p + s)]
    )
    # Nothing running: the prompt goes in at the full rate.
    assert expected_waits([], [(300, 10)], 1, p, s, 10) == pytest.approx([3.0])
    # One slot: each queued request waits for the whole answer of the one before it.
    assert expected_waits([(0, 5)], [(10, 50)] * 2, 1, p, s, None) == pytest.approx(
        [0.5 + 0.1, 0.6 + 50 * s + 0.1]
    )
