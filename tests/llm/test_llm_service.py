"""The llm service over real gRPC: lifecycle and settings with a tiny random model, and
generation on both in-process backends (the tiny model on transformers, the packaged
SmolLM2 GGUF on llama.cpp)."""

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from conftest import BACKENDS, COUNTING, bearer, collect, gen_overrides, out_of_memory
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from rpc_errors import error_info

from ragmesh.llm.v1 import llm_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GREEDY = {"temperature": 0.0}


def details(error: grpc.aio.AioRpcError):
    """(reason, field violations) from the google.rpc.Status of an error."""
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields


async def test_a_fresh_service_reports_not_loaded_and_refuses_generation(make_client):
    client = await make_client()
    assert await client.health_status() == NOT_SERVING
    status = (await client.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    assert status.state == llm_pb2.MODEL_STATE_NOT_LOADED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client.llm.Generate(llm_pb2.GenerateRequest(prompt="hi")))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "NOT_LOADED" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.llm.CountTokens(llm_pb2.CountTokensRequest(prompt="hi"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.llm.UnloadModel(llm_pb2.UnloadModelRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_load_watch_swap_failure_and_unload(make_client):
    client = await make_client()
    watch = client.llm.WatchModelStatus(llm_pb2.WatchModelStatusRequest())
    assert (await watch.read()).status.state == llm_pb2.MODEL_STATE_NOT_LOADED
    answer = await client.llm.LoadModel(
        llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model="tiny"))
    )
    assert answer.status.state == llm_pb2.MODEL_STATE_LOADING
    assert (await watch.read()).status.state == llm_pb2.MODEL_STATE_LOADING
    ready = (await watch.read()).status
    assert ready.state == llm_pb2.MODEL_STATE_READY
    assert ready.serving_model == "tiny"
    assert ready.context_length == 256
    assert ready.parameter_count > 0 and ready.memory_bytes > 0
    assert ready.device == "cpu"
    assert ready.load_duration.ToNanoseconds() > 0
    assert await client.health_status() == SERVING

    # A failed load reports why and leaves the old model serving.
    (client.app.server.settings.resolved_models_dir / "broken").mkdir()
    (client.app.server.settings.resolved_models_dir / "broken" / "config.json").write_text("{")
    failed = await client.load("broken")
    assert failed.state == llm_pb2.MODEL_STATE_FAILED
    assert failed.error
    assert failed.serving_model == "tiny"
    _, completion = await collect(
        client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=gen_overrides(max_new_tokens=3))
        )
    )
    assert completion.model == "tiny"

    # A swap: the new model takes over once READY, health never drops.
    swapped = await client.load("tiny-b")
    assert swapped.state == llm_pb2.MODEL_STATE_READY
    assert swapped.serving_model == "tiny-b"
    assert swapped.context_length == 512
    assert await client.health_status() == SERVING
    _, completion = await collect(
        client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=gen_overrides(max_new_tokens=3))
        )
    )
    assert completion.model == "tiny-b"
    listed = (await client.llm.ListModels(llm_pb2.ListModelsRequest())).models
    assert [m.id for m in listed if m.loaded] == ["tiny-b"]

    unloaded = await client.llm.UnloadModel(llm_pb2.UnloadModelRequest())
    assert unloaded.status.state == llm_pb2.MODEL_STATE_NOT_LOADED
    assert await client.health_status() == NOT_SERVING
    states = []
    while len(states) < 8:
        state = (await watch.read()).status.state
        states.append(state)
        if state == llm_pb2.MODEL_STATE_NOT_LOADED:
            break
    watch.cancel()
    assert states[-2:] == [llm_pb2.MODEL_STATE_UNLOADING, llm_pb2.MODEL_STATE_NOT_LOADED]
    assert llm_pb2.MODEL_STATE_FAILED in states


@pytest.mark.parametrize(
    ("options", "code", "reason"),
    [
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"model": "../../etc"}, grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_MODEL_ROOTS"),
        ({"model": "/etc"}, grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_MODEL_ROOTS"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ({"model": "tiny", "device": "tpu"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"model": "tiny", "dtype": "int3"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (
            {"model": "tiny", "quantization": llm_pb2.QUANTIZATION_NF4},
            grpc.StatusCode.FAILED_PRECONDITION,
            "QUANTIZATION_NEEDS_CUDA",
        ),
        (
            {"model": "tiny", "quantization": llm_pb2.QUANTIZATION_INT8},
            grpc.StatusCode.FAILED_PRECONDITION,
            "QUANTIZATION_NEEDS_CUDA",
        ),
        (
            {"model": "tiny", "backend": llm_pb2.BACKEND_OPENAI_COMPATIBLE},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            {"model": "tiny", "backend": llm_pb2.BACKEND_LLAMA_CPP},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            {"model": "SmolLM2-135M-Instruct", "dtype": "bfloat16"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            {"model": "SmolLM2-135M-Instruct", "quantization": llm_pb2.QUANTIZATION_NF4},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
    ],
)
async def test_bad_load_options_get_a_precise_status(tiny, options, code, reason):
    if options["model"] == "tiny" and "quantization" in options and torch.cuda.is_available():
        pytest.skip("this node has CUDA; quantization is allowed here")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tiny.llm.LoadModel(llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(**options)))
    assert caught.value.code() == code
    assert details(caught.value)[0] == reason
    status = (await tiny.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    assert status.state == llm_pb2.MODEL_STATE_READY and status.serving_model == "tiny"


async def test_cuda_device_without_cuda_is_failed_precondition(tiny):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tiny.llm.LoadModel(
            llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model="tiny", device="cuda:0"))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_hub_id_offline_fails_the_load_with_a_reason(make_client):
    client = await make_client()
    status = await client.load("someone/not-cached-model", wait_seconds=60)
    assert status.state == llm_pb2.MODEL_STATE_FAILED
    assert status.error
    assert await client.health_status() == NOT_SERVING


async def test_generation_config_update_confirms_and_rejects_bad_values(make_client):
    client = await make_client()
    llm = client.llm
    config = (await llm.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest())).config
    assert config.revision == 0 and config.max_new_tokens == 256

    applied = (
        await llm.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(
                config=llm_pb2.GenerationConfig(temperature=0.0, max_new_tokens=32, seed=7),
                update_mask={"paths": ["temperature", "max_new_tokens", "seed"]},
            )
        )
    ).config
    assert (applied.temperature, applied.max_new_tokens, applied.seed) == (0.0, 32, 7)
    assert applied.revision == 1
    assert applied.top_p == config.top_p

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await llm.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(
                config=llm_pb2.GenerationConfig(
                    temperature=3.0, top_p=0.0, stop_sequences=["x" * 65]
                ),
                update_mask={"paths": ["temperature", "top_p", "stop_sequences", "top_k"]},
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = details(caught.value)
    assert set(fields) == {"config.temperature", "config.top_p", "config.stop_sequences[0]"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await llm.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(update_mask={"paths": ["colour"]})
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unchanged = (await llm.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest())).config
    assert unchanged == applied

    # Without a mask, the set fields apply.
    applied = (
        await llm.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(
                config=llm_pb2.GenerationConfig(top_k=5, stop_sequences=["END"])
            )
        )
    ).config
    assert (applied.top_k, list(applied.stop_sequences), applied.revision) == (5, ["END"], 2)
    assert applied.max_new_tokens == 32


async def test_generate_streams_deltas_then_a_completion(served):
    call = served.llm.Generate(
        llm_pb2.GenerateRequest(
            prompt="Once upon a time", overrides=gen_overrides(max_new_tokens=12, **GREEDY)
        )
    )
    deltas, completion = await collect(call)
    assert completion is not None
    assert "".join(deltas) == completion.text
    assert completion.finish_reason in (llm_pb2.FINISH_REASON_LENGTH, llm_pb2.FINISH_REASON_EOS)
    assert completion.usage.prompt_tokens == 4
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.timings.total.ToNanoseconds() >= (
        completion.timings.time_to_first_token.ToNanoseconds()
    )
    assert completion.timings.tokens_per_second > 0
    assert "\ufffd" not in completion.text

    _, repeat = await collect(
        served.llm.Generate(
            llm_pb2.GenerateRequest(
                prompt="Once upon a time", overrides=gen_overrides(max_new_tokens=12, **GREEDY)
            )
        )
    )
    assert repeat.text == completion.text


async def test_seeded_sampling_is_reproducible_and_overrides_leave_the_config(served):
    before = (await served.llm.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest())).config
    overrides = gen_overrides(max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0, seed=42)
    runs = [
        await collect(served.llm.Generate(llm_pb2.GenerateRequest(prompt="a", overrides=overrides)))
        for _ in range(2)
    ]
    assert runs[0][1].text == runs[1][1].text
    after = (await served.llm.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest())).config
    assert after == before


async def _text(client, prompt: str, **overrides) -> str:
    request = llm_pb2.GenerateRequest(prompt=prompt, overrides=gen_overrides(**overrides))
    return (await collect(client.llm.Generate(request)))[1].text


async def test_each_sampling_setting_takes_effect(served):
    prompt, hot = "Once upon a time", {"max_new_tokens": 16, "temperature": 1.5}
    greedy = await _text(served, prompt, max_new_tokens=16, temperature=0.0)
    seeded = {
        await _text(served, prompt, top_k=0, top_p=1.0, seed=seed, **hot) for seed in (1, 2, 3)
    }
    assert len(seeded) > 1  # the seed drives the draw
    # Keeping one candidate, by top-k or by top-p, is greedy decoding whatever the seed.
    assert await _text(served, prompt, top_k=1, top_p=1.0, seed=1, **hot) == greedy
    assert await _text(served, prompt, top_k=0, top_p=1e-6, seed=2, **hot) == greedy
    # A strong repetition penalty changes what greedy decoding of a repetitive prompt says.
    loop = "one two one two one two one two"
    plain = await _text(served, loop, max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    penalised = await _text(served, loop, max_new_tokens=8, temperature=0.0, repetition_penalty=2.0)
    assert plain != penalised


async def test_stop_sequences_end_generation_and_never_reach_the_caller(served):
    _, free = await collect(
        served.llm.Generate(
            llm_pb2.GenerateRequest(
                prompt="Once upon a time", overrides=gen_overrides(max_new_tokens=24, **GREEDY)
            )
        )
    )
    stop = free.text.strip()[3:6]
    assert stop
    deltas, completion = await collect(
        served.llm.Generate(
            llm_pb2.GenerateRequest(
                prompt="Once upon a time",
                overrides=gen_overrides(max_new_tokens=24, stop_sequences=[stop], **GREEDY),
            )
        )
    )
    assert completion.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert stop not in "".join(deltas)
    assert free.text.startswith(completion.text)
    assert completion.text == free.text[: free.text.find(stop)]


async def test_bad_generation_requests(served):
    cases = [
        (llm_pb2.GenerateRequest(prompt=""), "prompt"),
        (
            llm_pb2.GenerateRequest(prompt="x", overrides=gen_overrides(temperature=-1)),
            "overrides.temperature",
        ),
        (
            llm_pb2.GenerateRequest(prompt="x", overrides=gen_overrides(max_new_tokens=0)),
            "overrides.max_new_tokens",
        ),
        (
            llm_pb2.GenerateRequest(
                prompt="word " * 300, overrides=gen_overrides(max_new_tokens=8)
            ),
            "prompt",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(served.llm.Generate(request))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in details(caught.value)[1]


async def test_count_tokens_for_prompts_and_chats(served):
    counted = await served.llm.CountTokens(llm_pb2.CountTokensRequest(prompt="Once upon a time"))
    assert (counted.token_count, counted.context_length) == (4, 256)
    messages = llm_pb2.ChatMessages(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content="Once upon a time")]
    )
    chat = await served.llm.CountTokens(llm_pb2.CountTokensRequest(messages=messages))
    assert chat.token_count > counted.token_count  # the chat template adds its markers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.llm.CountTokens(llm_pb2.CountTokensRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _user(text):
    return llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=text)


def _assistant(text):
    return llm_pb2.ChatMessage(role=llm_pb2.ROLE_ASSISTANT, content=text)


async def test_chat_drops_oldest_messages_to_fit_and_refuses_what_cannot(served):
    long = "lorem ipsum " * 30
    request = llm_pb2.ChatRequest(
        system_prompt="Be brief.",
        messages=[_user(long), _assistant(long), _user(long), _assistant("ok"), _user("Hi?")],
        overrides=gen_overrides(max_new_tokens=64, **GREEDY),
    )
    deltas, completion = await collect(served.llm.Chat(request))
    assert completion.dropped_messages >= 2
    assert completion.usage.prompt_tokens + 64 <= 256
    assert "".join(deltas) == completion.text

    request = llm_pb2.ChatRequest(
        messages=[_user("word " * 400)], overrides=gen_overrides(max_new_tokens=8)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(served.llm.Chat(request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[0] == "CONTEXT_WINDOW_EXCEEDED"

    for bad in (
        llm_pb2.ChatRequest(),
        llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(content="no role")]),
        llm_pb2.ChatRequest(messages=[_assistant("only me")]),
        llm_pb2.ChatRequest(messages=[_user("hi")], context=[llm_pb2.ContextPassage(id="x")]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(served.llm.Chat(bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_rpc_stops_generation(served):
    call = served.llm.Generate(
        llm_pb2.GenerateRequest(
            prompt=COUNTING,
            request_id="to-cancel",
            overrides=gen_overrides(max_new_tokens=200, **GREEDY),
        )
    )
    first = await call.read()
    assert first.request_id == "to-cancel"
    await served.llm.Cancel(llm_pb2.CancelRequest(request_id="to-cancel"))
    _, completion = await collect(call)
    assert completion.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
    assert completion.usage.completion_tokens < 200

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.llm.Cancel(llm_pb2.CancelRequest(request_id="to-cancel"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_streams_each_get_their_own_answer(tiny):
    prompts = ["Once upon a time", "The weather", "In a galaxy far away there was", "Hi"]
    alone = []
    for prompt in prompts:
        _, completion = await collect(
            tiny.llm.Generate(
                llm_pb2.GenerateRequest(
                    prompt=prompt, overrides=gen_overrides(max_new_tokens=10, **GREEDY)
                )
            )
        )
        alone.append(completion.text)
    together = await asyncio.gather(
        *(
            collect(
                tiny.llm.Generate(
                    llm_pb2.GenerateRequest(
                        prompt=prompt, overrides=gen_overrides(max_new_tokens=10, **GREEDY)
                    )
                )
            )
            for prompt in prompts * 2
        )
    )
    # Eight streams on a batch of four with a queue of four: all served, same answers.
    assert [c.text for _, c in together] == alone * 2


# Prompts whose greedy continuation SmolLM2 gets right with a wide margin: where the next
# best token is within a logit, that path names the answer too ("Monday, Tuesday,
# Wednesday," did not: " and Friday" was 0.4 logits behind " and Thursday").
SEQUENCES = {
    "1, 2, 3, 4, 5, 6, 7, 8,": "9",
    "A, B, C, D, E, F, G,": "H",
    "Sunday, Monday, Tuesday,": "Wednesday",
    "January, February, March, April,": "May",
    "10, 20, 30, 40, 50,": "60",
    "one, two, three, four, five,": "six",
    "2, 4, 6, 8, 10, 12,": "14",
    "Mercury, Venus, Earth,": "Mars",
}


@pytest.mark.parametrize("backend", ["llama_cpp"], indirect=True)
async def test_llama_cpp_decodes_streams_together_each_answering_its_own_prompt(served):
    """Beside others a request's logits may shift a little (see llama_backend), so the
    answers are checked for what each prompt calls for rather than compared exactly."""
    events = []

    async def run(index: int, prompt: str) -> str:
        request = llm_pb2.GenerateRequest(
            prompt=prompt, overrides=gen_overrides(max_new_tokens=10, **GREEDY)
        )
        call = served.llm.Generate(request)
        while (response := await call.read()) is not grpc.aio.EOF:
            events.append((index, response.WhichOneof("event")))
            if response.WhichOneof("event") == "completion":
                return response.completion.text
        raise AssertionError("the stream ended without a completion")

    answers = await asyncio.gather(*(run(i, p) for i, p in enumerate(SEQUENCES)))
    for answer, expected in zip(answers, SEQUENCES.values(), strict=True):
        assert expected in answer
    # A batch of four: four streams had text before the first of them finished.
    first_done = next(i for i, (_, kind) in enumerate(events) if kind == "completion")
    assert len({index for index, kind in events[:first_done] if kind == "delta"}) == 4


async def _base_model(backend: str, folder: Path, smollm_gguf: Path, models_dir: Path) -> Path:
    """A base model, one without a chat template: the packaged GGUF with
    tokenizer.chat_template removed, or a copy of the tiny model without its template."""
    if backend == "llama_cpp":
        await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "gguf.scripts.gguf_new_metadata",
                "--remove-metadata",
                "tokenizer.chat_template",
                "--force",
                str(smollm_gguf),
                str(folder / "base.gguf"),
            ],
            check=True,
            capture_output=True,
        )
        return folder / "base.gguf"
    base = folder / "base"
    shutil.copytree(models_dir / "tiny", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


async def test_a_model_without_a_chat_template_serves_generate_and_refuses_chat(
    make_client, backend, smollm_gguf, models_dir, tmp_path
):
    model = await _base_model(backend, tmp_path, smollm_gguf, models_dir)
    client = await make_client(model_roots=[tmp_path])
    status = await client.load(str(model))
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    assert llm_pb2.Backend.Name(status.options.backend) == f"BACKEND_{backend.upper()}"
    request = llm_pb2.GenerateRequest(
        prompt="1, 2, 3, 4, 5,", overrides=gen_overrides(max_new_tokens=4, **GREEDY)
    )
    _, completion = await collect(client.llm.Generate(request))
    assert completion.usage.completion_tokens > 0
    if backend == "llama_cpp":
        assert "6" in completion.text
    chat = llm_pb2.ChatRequest(messages=[_user("Hi")])
    for call in (
        lambda: collect(client.llm.Chat(chat)),
        lambda: client.llm.CountTokens(
            llm_pb2.CountTokensRequest(messages=llm_pb2.ChatMessages(messages=chat.messages))
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "NO_CHAT_TEMPLATE"
        assert "chat template" in caught.value.details()


KEYS = {
    "admin-key": "root:acme:admin",
    "alice-key": "alice:acme",
    "carol-key": "carol:acme",
    "bob-key": "bob:globex",
}


async def test_only_admins_change_the_model_and_the_generation_settings(make_client):
    client = await make_client(api_keys=KEYS)
    alice, admin = bearer("alice-key"), bearer("admin-key")
    llm = client.llm
    refused = [
        llm.LoadModel(
            llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model="tiny")), metadata=alice
        ),
        llm.UnloadModel(llm_pb2.UnloadModelRequest(), metadata=alice),
        llm.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(config=llm_pb2.GenerationConfig(top_k=3)),
            metadata=alice,
        ),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(caught.value)
        assert (info.reason, info.metadata["scope"]) == ("SCOPE_REQUIRED", "admin")
    status = (await llm.GetModelStatus(llm_pb2.GetModelStatusRequest(), metadata=alice)).status
    assert status.state == llm_pb2.MODEL_STATE_NOT_LOADED
    config = (
        await llm.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest(), metadata=alice)
    ).config
    assert config.revision == 0

    assert (await client.load("tiny", metadata=admin)).state == llm_pb2.MODEL_STATE_READY
    applied = await llm.UpdateGenerationConfig(
        llm_pb2.UpdateGenerationConfigRequest(config=llm_pb2.GenerationConfig(top_k=3)),
        metadata=admin,
    )
    assert applied.config.top_k == 3
    _, completion = await collect(
        llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=gen_overrides(max_new_tokens=2)),
            metadata=alice,
        )
    )
    assert completion.model == "tiny"
    unloaded = await llm.UnloadModel(llm_pb2.UnloadModelRequest(), metadata=admin)
    assert unloaded.status.state == llm_pb2.MODEL_STATE_NOT_LOADED


async def _cancel_once_queued(client, key: str, request_id: str) -> None:
    """Cancels the caller's request as soon as the service has it."""
    while True:
        try:
            await client.llm.Cancel(
                llm_pb2.CancelRequest(request_id=request_id), metadata=bearer(key)
            )
            return
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0.01)


async def test_cancel_reaches_only_the_callers_own_requests(make_client, faulty_engines, backend):
    model, settings = BACKENDS[backend]
    client = await make_client(api_keys=KEYS, **settings)
    assert (await client.load(model, metadata=bearer("admin-key"))).state == (
        llm_pb2.MODEL_STATE_READY
    )
    (engine,) = faulty_engines
    # The model runs nothing until the gate opens, so the requests stay running.
    engine.model.gate.clear()
    long = gen_overrides(max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0)

    def generate(key):
        return client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Once", request_id="r1", overrides=long),
            metadata=bearer(key),
        )

    alices = generate("alice-key")
    assert await asyncio.to_thread(engine.model.held.wait, 60)  # her prompt is at the gate
    # Another tenant, and another subject of the same tenant, reach nothing: the id is
    # unknown to them, and they may use it for requests of their own.
    for key in ("bob-key", "carol-key"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.llm.Cancel(llm_pb2.CancelRequest(request_id="r1"), metadata=bearer(key))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "REQUEST_NOT_FOUND"
    bobs = generate("bob-key")
    await _cancel_once_queued(client, "bob-key", "r1")
    await client.llm.Cancel(llm_pb2.CancelRequest(request_id="r1"), metadata=bearer("alice-key"))
    engine.model.gate.set()
    for call in (alices, bobs):
        _, completion = await collect(call)
        assert completion.finish_reason == llm_pb2.FINISH_REASON_CANCELLED


async def test_remote_code_runs_only_where_the_operator_allows_it(make_client):
    asks = {"model": "tiny", "trust_remote_code": True}
    for settings, setting in (
        ({}, "RAGMESH_LLM_TRUST_REMOTE_CODE"),
        (
            {"trust_remote_code": True, "trust_remote_code_repos": ["acme/reviewed"]},
            "RAGMESH_LLM_TRUST_REMOTE_CODE_REPOS",
        ),
    ):
        client = await make_client(**settings)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.llm.LoadModel(
                llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(**asks))
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(caught.value)
        assert (info.reason, info.metadata["setting"]) == ("REMOTE_CODE_NOT_ALLOWED", setting)
        assert setting in caught.value.details()
        status = (await client.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
        assert status.state == llm_pb2.MODEL_STATE_NOT_LOADED

    client = await make_client(trust_remote_code=True, trust_remote_code_repos=["tiny"])
    assert (await client.load(**asks)).state == llm_pb2.MODEL_STATE_READY


async def test_a_request_failing_on_its_own_fails_alone(make_client, faulty_engines, backend):
    model, settings = BACKENDS[backend]
    client = await make_client(**settings)
    assert (await client.load(model)).state == llm_pb2.MODEL_STATE_READY
    (engine,) = faulty_engines
    engine.model.raise_on_prompt[tuple(engine.encode("a huge prompt"))] = out_of_memory(backend)
    engine.model.nan_on_prompt.add(tuple(engine.encode("a poisoned prompt")))
    sampled = gen_overrides(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0)

    other = client.llm.Generate(llm_pb2.GenerateRequest(prompt="Once upon", overrides=sampled))
    await other.read()
    for prompt, code, reason in (
        ("a huge prompt", grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
        ("a poisoned prompt", grpc.StatusCode.INTERNAL, "GENERATION_FAILED"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(
                client.llm.Generate(
                    llm_pb2.GenerateRequest(prompt=prompt, overrides=sampled),
                    metadata=(("x-request-id", reason),),
                )
            )
        assert caught.value.code() == code
        info = error_info(caught.value)
        assert (info.reason, info.metadata["request_id"]) == (reason, reason)
        assert "injected" not in caught.value.details()

    _, completion = await collect(other)
    assert completion.finish_reason in (llm_pb2.FINISH_REASON_LENGTH, llm_pb2.FINISH_REASON_EOS)
    assert await client.health_status() == SERVING
    status = (await client.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    assert status.state == llm_pb2.MODEL_STATE_READY
    _, completion = await collect(
        client.llm.Generate(llm_pb2.GenerateRequest(prompt="Hello", overrides=sampled))
    )
    assert completion.usage.completion_tokens > 0


async def test_health_and_model_status_follow_an_engine_restart(
    make_client, faulty_engines, backend
):
    model, settings = BACKENDS[backend]
    client = await make_client(**settings)
    assert (await client.load(model)).state == llm_pb2.MODEL_STATE_READY
    (engine,) = faulty_engines
    health = client.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await health.read()).status == SERVING
    watch = client.llm.WatchModelStatus(llm_pb2.WatchModelStatusRequest())
    assert (await watch.read()).status.state == llm_pb2.MODEL_STATE_READY
    sampled = gen_overrides(max_new_tokens=100, temperature=1.0, top_k=0, top_p=1.0)
    running = client.llm.Generate(
        llm_pb2.GenerateRequest(
            prompt=COUNTING, overrides=gen_overrides(max_new_tokens=100, **GREEDY)
        )
    )
    await running.read()

    # A batched step fails, and the restarted engine's probe waits until the gate opens.
    engine.model.fail_next_decode_step(RuntimeError("injected: cache mismatch"), then_hold=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(running)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "BATCH_FAILED"
    assert (await health.read()).status == NOT_SERVING
    restarting = (await watch.read()).status
    assert restarting.state == llm_pb2.MODEL_STATE_RESTARTING
    assert "RuntimeError" in restarting.error
    assert restarting.serving_model == model
    status = (await client.llm.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    assert status.state == llm_pb2.MODEL_STATE_RESTARTING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(
            client.llm.Generate(llm_pb2.GenerateRequest(prompt="Hello", overrides=sampled))
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "ENGINE_RESTARTING"

    engine.model.gate.set()
    assert (await health.read()).status == SERVING
    ready = (await watch.read()).status
    assert (ready.state, ready.error) == (llm_pb2.MODEL_STATE_READY, "")
    health.cancel()
    watch.cancel()
    _, completion = await collect(
        client.llm.Generate(llm_pb2.GenerateRequest(prompt="Hello", overrides=sampled))
    )
    assert completion.usage.completion_tokens > 0
