"""The packaged default model through the service: its GGUF loads at start, real answers."""

import asyncio
import time

import grpc
import pytest
from conftest import COUNTING, Client, collect, gen_overrides, llm_settings

from ragmesh.llm.v1 import llm_pb2
from services.llm.app import start
from services.llm.catalogue import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def smol(tmp_path_factory):
    """The service as an operator starts it: the default model loads at start."""
    data = tmp_path_factory.mktemp("smol-data")
    settings = llm_settings(data / "models", data, default_model=DEFAULT_MODEL_NAME)
    client = Client(await start(settings))
    watch = client.llm.WatchModelStatus(llm_pb2.WatchModelStatusRequest(), timeout=120)
    while (status := (await watch.read()).status).state != llm_pb2.MODEL_STATE_READY:
        assert status.state != llm_pb2.MODEL_STATE_FAILED, status.error
    watch.cancel()
    yield client
    await client.close()


# Greedy decoding of this question takes each token of "The capital of France is Paris."
# and then its end by more than a logit over the next best, on llama.cpp and transformers
# alike; without "Answer with one word." the first token was a near-tie (0.1-0.2 logits)
# with "Le"/"L'", whose answers never name Paris: another CPU's rounding could tip it.
QUESTION = "What is the capital of France? Answer with one word."


async def test_the_default_model_answers_a_simple_question(smol):
    request = llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=QUESTION)],
        overrides=gen_overrides(temperature=0.0, max_new_tokens=24),
    )
    deltas, completion = await collect(smol.llm.Chat(request))
    assert "Paris" in "".join(deltas)
    assert completion.finish_reason == llm_pb2.FINISH_REASON_EOS
    assert completion.model == DEFAULT_MODEL_NAME
    status = (await smol.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    assert status.options.backend == llm_pb2.BACKEND_LLAMA_CPP
    assert (status.device, status.context_length) == ("cpu", 8192)
    assert 100_000_000 < status.parameter_count < 200_000_000
    assert status.memory_bytes > 0
    listed = (await smol.llm.ListModels(llm_pb2.ListModelsRequest())).models
    loaded = [m for m in listed if m.loaded]
    assert [(m.id, m.source, m.format) for m in loaded] == [
        (DEFAULT_MODEL_NAME, llm_pb2.MODEL_SOURCE_PACKAGE, llm_pb2.MODEL_FORMAT_GGUF)
    ]
    # It runs from the package's file: nothing was converted into the models folder.
    models_dir = smol.app.server.settings.resolved_models_dir
    assert not models_dir.exists() or not any(models_dir.iterdir())


async def test_the_transformers_backend_still_loads_the_gguf_when_named(make_client):
    client = await make_client()
    status = await client.load(DEFAULT_MODEL_NAME, backend=llm_pb2.BACKEND_TRANSFORMERS)
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    assert status.options.backend == llm_pb2.BACKEND_TRANSFORMERS
    request = llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=QUESTION)],
        overrides=gen_overrides(temperature=0.0, max_new_tokens=24),
    )
    deltas, _ = await collect(client.llm.Chat(request))
    assert "Paris" in "".join(deltas)


async def test_a_second_load_while_one_is_in_flight_is_refused(smol):
    options = llm_pb2.LoadOptions(model=DEFAULT_MODEL_NAME)
    first = await smol.llm.LoadModel(llm_pb2.LoadModelRequest(options=options))
    assert first.status.state == llm_pb2.MODEL_STATE_LOADING
    assert first.status.serving_model == DEFAULT_MODEL_NAME
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await smol.llm.LoadModel(llm_pb2.LoadModelRequest(options=options))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The old model keeps answering during the swap.
    _, completion = await collect(
        smol.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=gen_overrides(max_new_tokens=2))
        )
    )
    assert completion.usage.completion_tokens >= 1
    watch = smol.llm.WatchModelStatus(llm_pb2.WatchModelStatusRequest(), timeout=120)
    while (await watch.read()).status.state != llm_pb2.MODEL_STATE_READY:
        pass
    watch.cancel()


async def _reusable(client, request_id: str, within: float) -> bool:
    """True once a new request may take request_id, i.e. the old one was freed."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        try:
            await collect(
                client.llm.Generate(
                    llm_pb2.GenerateRequest(
                        prompt="Hi",
                        request_id=request_id,
                        overrides=gen_overrides(max_new_tokens=1),
                    )
                )
            )
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            await asyncio.sleep(0.05)
    return False


async def test_a_client_cancel_or_deadline_stops_generation(smol):
    # 300 tokens take the real model far longer than the second allowed below, and greedy
    # counting does not end early: at no step is its end likely (a sampled story sometimes
    # ended early, and a greedy one came within a twentieth of a logit of another path,
    # with an end likely 30 tokens in). The second is still well beyond the prompt's
    # expected wait, so admission lets it in on a loaded machine, where a fraction of a
    # second might be refused as unreachable.
    overrides = gen_overrides(max_new_tokens=300, temperature=0)
    prompt = COUNTING
    call = smol.llm.Generate(
        llm_pb2.GenerateRequest(prompt=prompt, request_id="gone", overrides=overrides)
    )
    await call.read()
    call.cancel()
    assert await _reusable(smol, "gone", within=5)

    call = smol.llm.Generate(
        llm_pb2.GenerateRequest(prompt=prompt, request_id="late", overrides=overrides),
        timeout=1.0,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _reusable(smol, "late", within=5)
