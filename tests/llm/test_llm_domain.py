"""Domain modules without a server: decoding, settings store, catalogue, the batching engines."""

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, FaultInjectingLlama, FaultInjectingModel
from pydantic import ValidationError

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.llm import catalogue, llama_backend
from services.llm.decoding import IncrementalDecoder
from services.llm.engine import Delta, FinishReason, Job, Message, Result
from services.llm.genconfig import GenerationConfigStore, GenerationParams, apply_overrides
from services.llm.hub import choose_files
from services.llm.loading import LoadOptions, check_options, load_llama_cpp, load_transformers
from services.llm.settings import LlmSettings


async def _load(backend: str, models_dir: Path, max_batch: int, max_queue: int):
    """An engine of the backend's test model, as LoadModel makes it (context 256)."""
    model, _ = BACKENDS[backend]
    settings = LlmSettings(models_dir=models_dir)
    resolved = catalogue.resolve(model, "", models_dir, settings.resolved_model_roots)
    options, device = check_options(LoadOptions(model=model), settings, resolved)
    limits = {"max_batch": max_batch, "max_queue": max_queue, "max_context": 256}
    if options.backend == "llama_cpp":
        return await asyncio.to_thread(
            load_llama_cpp, resolved, options, device, threads=1, **limits
        )
    return await asyncio.to_thread(load_transformers, resolved, options, device, **limits)


@pytest.fixture(scope="module")
async def engine(backend, models_dir):
    loaded = await _load(backend, models_dir, max_batch=4, max_queue=1)
    yield loaded
    await loaded.close()


def test_deltas_are_whole_characters_even_when_tokens_split_them(engine):
    text = "héllo 🌍 wörld, 日本語のテキスト ✓"
    ids = engine.encode(text)
    decoder = IncrementalDecoder(engine.tokenizer)
    deltas = [decoder.add(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # Byte-level BPE splits these characters over several tokens: text was held back.
    assert len(ids) > len([d for d in deltas if d])


def test_stop_sequences_are_cut_and_held_back(engine):
    ids = engine.encode("The answer is 42. END of story")
    decoder = IncrementalDecoder(engine.tokenizer, stop_sequences=("END",))
    sent = ""
    for token in ids:
        sent += decoder.add(token)
        assert "END" not in sent
        if decoder.stopped:
            break
    assert decoder.stopped
    assert sent + decoder.flush() == "The answer is 42. "


def test_the_store_applies_all_or_nothing_and_persists(tmp_path):
    path = tmp_path / "config.json"
    store = GenerationConfigStore(path)
    assert store.get() == GenerationParams()
    applied = store.update({"temperature": 0.0, "stop_sequences": ("\n\n",)}, 8192)
    assert (applied.temperature, applied.revision) == (0.0, 1)
    with pytest.raises(InvalidArgument) as caught:
        store.update({"top_k": -1, "max_new_tokens": 9000}, 8192)
    assert {f for f, _ in caught.value.field_violations} == {
        "config.top_k",
        "config.max_new_tokens",
    }
    assert store.get() == applied
    assert GenerationConfigStore(path).get() == applied


def test_overrides_are_validated_and_leave_the_base_alone():
    base = GenerationParams()
    params = apply_overrides(base, {"temperature": 0.0, "seed": 1}, 1024)
    assert params.greedy and params.seed == 1
    assert base.temperature == 0.7
    with pytest.raises(InvalidArgument):
        apply_overrides(base, {"repetition_penalty": 0.5}, 1024)


def _hf_cache_entry(cache: Path) -> None:
    snapshot = cache / "models--acme--small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    (snapshot / "model.safetensors").write_bytes(b"\0" * 16)
    (cache / "models--acme--small" / "refs").mkdir()
    (cache / "models--acme--small" / "refs" / "main").write_text("abc123")


def test_the_catalogue_lists_local_folders_gguf_files_cache_and_package(models_dir, tmp_path):
    cache = Path(os.environ["HF_HUB_CACHE"])
    if not (cache / "models--acme--small").exists():
        _hf_cache_entry(cache)
    (models_dir / "nested").mkdir(exist_ok=True)
    (models_dir / "nested" / "small.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    entries = {e.id: e for e in catalogue.list_models(models_dir)}
    assert entries["tiny"].format == "safetensors"
    assert entries["tiny"].architecture == "LlamaForCausalLM"
    assert entries["tiny"].size_bytes > 0
    assert entries["nested/small.gguf"].format == "gguf"
    assert entries["acme/small"].source == "hf_cache"
    assert entries["acme/small"].revision == "abc123"
    assert entries["acme/small"].architecture == "MistralForCausalLM"
    packaged = entries[catalogue.DEFAULT_MODEL_NAME]
    assert (packaged.source, packaged.format) == ("package", "gguf")
    assert catalogue.list_models(tmp_path / "missing")  # the package is still there


def test_the_packaged_model_is_its_gguf_whatever_the_models_folder_holds(tmp_path, smollm_gguf):
    # Older versions converted it into <models>/SmolLM2-135M-Instruct; such a folder is
    # neither listed nor loaded under the packaged model's name.
    old = tmp_path / catalogue.DEFAULT_MODEL_NAME
    old.mkdir()
    (old / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (old / "model.safetensors").write_bytes(b"\0" * 16)
    listed = [e for e in catalogue.list_models(tmp_path) if e.id == catalogue.DEFAULT_MODEL_NAME]
    assert [(e.source, e.path) for e in listed] == [("package", str(smollm_gguf))]
    for name in (catalogue.DEFAULT_MODEL_NAME, catalogue.PACKAGE_ID):
        resolved = catalogue.resolve(name, "", tmp_path, [tmp_path])
        assert (resolved.name, resolved.path, resolved.gguf_file) == (
            catalogue.DEFAULT_MODEL_NAME,
            smollm_gguf.parent,
            smollm_gguf.name,
        )


def test_resolution_stays_inside_the_model_roots(models_dir, tmp_path):
    roots = [models_dir.resolve()]
    assert catalogue.resolve("tiny", "", models_dir, roots).path == (models_dir / "tiny").resolve()
    assert catalogue.resolve("acme/other", "", models_dir, roots).hub_id == "acme/other"
    gguf = catalogue.resolve("nested/small.gguf", "", models_dir, roots)
    assert gguf.gguf_file == "small.gguf"
    (models_dir / "escape").symlink_to(tmp_path)
    try:
        for outside in ("../", "/etc", "escape", "tiny/../../x"):
            with pytest.raises(PermissionDenied):
                catalogue.resolve(outside, "", models_dir, roots)
    finally:
        (models_dir / "escape").unlink()
    with pytest.raises(PermissionDenied):
        catalogue.resolve("tiny", "../../etc/passwd", models_dir, roots)
    with pytest.raises(NotFound):
        catalogue.resolve("./absent", "", models_dir, roots)


async def _drain(stream):
    return [event async for event in stream]


async def _settle():
    """Lets the tasks just created run up to their first await (their submission)."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
async def faulty_engine(backend, models_dir):
    """Makes engines of the backend's test model, each model in a fault injector."""
    engines = []
    injector = FaultInjectingLlama if backend == "llama_cpp" else FaultInjectingModel

    async def make(max_batch: int, max_queue: int):
        engine = await _load(backend, models_dir, max_batch, max_queue)
        engine.model = injector(engine.model)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.model.gate.set()
        await engine.close()


async def test_a_full_queue_answers_resource_exhausted(faulty_engine):
    engine = await faulty_engine(max_batch=1, max_queue=1)
    engine.model.gate.clear()
    params = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=200)
    ids = engine.encode("Once upon a time")
    a, b = Job("a", params, prompt_ids=ids), Job("b", params, prompt_ids=ids)
    running = asyncio.create_task(_drain(engine.stream(a)))
    waiting = asyncio.create_task(_drain(engine.stream(b)))
    await _settle()
    with pytest.raises(ResourceExhausted):
        await _drain(engine.stream(Job("c", params, prompt_ids=ids)))
    assert engine.cancel(a.key) and engine.cancel(b.key)
    engine.model.gate.set()
    assert (await running)[-1].finish_reason is FinishReason.CANCELLED
    assert (await waiting)[-1].finish_reason is FinishReason.CANCELLED


async def test_a_burst_beyond_the_batch_and_the_queue_is_refused_for_the_excess(faulty_engine):
    engine = await faulty_engine(max_batch=2, max_queue=2)
    # No request finishes while the burst arrives.
    engine.model.gate.clear()
    params = GenerationParams(temperature=0.0, max_new_tokens=3)
    ids = engine.encode("Once upon a time")
    burst = [
        asyncio.create_task(_drain(engine.stream(Job(f"r{i}", params, prompt_ids=ids))))
        for i in range(7)
    ]
    await _settle()
    refused = [task for task in burst if task.done()]
    assert len(refused) == 7 - (2 + 2)
    for task in refused:
        assert isinstance(task.exception(), ResourceExhausted)
        assert task.exception().reason == "QUEUE_FULL"
    engine.model.gate.set()
    served = await asyncio.gather(*(task for task in burst if task not in refused))
    assert [type(events[-1]) for events in served] == [Result] * 4


async def test_a_failed_decode_step_fails_the_batch_and_waiting_requests_keep_their_place(
    faulty_engine,
):
    engine = await faulty_engine(max_batch=1, max_queue=2)
    engine.model.gate.clear()
    ids = engine.encode("Once upon a time")
    running = asyncio.create_task(
        _drain(engine.stream(Job("a", GenerationParams(max_new_tokens=200), prompt_ids=ids)))
    )
    waiting = asyncio.create_task(
        _drain(engine.stream(Job("b", GenerationParams(max_new_tokens=4), prompt_ids=ids)))
    )
    await _settle()
    # The first batched step, right after a's prompt, fails; b waits behind a.
    engine.model.fail_next_decode_step(RuntimeError("injected: KV cache mismatch"))
    engine.model.gate.set()
    with pytest.raises(Unavailable) as caught:
        await running
    assert caught.value.reason == "BATCH_FAILED"
    events = await waiting
    assert events[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert engine.failure == ""


def test_a_hub_download_takes_only_what_a_load_needs_within_the_size_limit():
    listing = [
        ("config.json", 700),
        ("generation_config.json", 100),
        ("tokenizer.json", 2_000),
        ("tokenizer_config.json", 300),
        ("chat_template.jinja", 200),
        ("model-00001-of-00002.safetensors", 4_000),
        ("model-00002-of-00002.safetensors", 3_000),
        ("model.safetensors.index.json", 50),
        ("consolidated.safetensors", 7_000),
        ("pytorch_model.bin", 7_000),
        ("modeling_custom.py", 900),
        ("onnx/model.onnx", 7_000),
        ("README.md", 10),
    ]
    needed = [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert choose_files(listing, gguf_file="", remote_code=False, max_bytes=10_350) == needed
    assert choose_files(listing, gguf_file="", remote_code=True, max_bytes=20_000) == sorted(
        [*needed, "modeling_custom.py"]
    )
    with pytest.raises(FailedPrecondition) as caught:
        choose_files(listing, gguf_file="", remote_code=False, max_bytes=10_349)
    assert caught.value.reason == "DOWNLOAD_TOO_LARGE"
    assert caught.value.metadata["setting"] == "RAGMESH_LLM_HUB_MAX_DOWNLOAD_BYTES"
    assert "RAGMESH_LLM_HUB_MAX_DOWNLOAD_BYTES" in caught.value.message

    gguf = [("q4/small.Q4_K_M.gguf", 900), ("small.Q8_0.gguf", 1_800), ("config.json", 10)]
    assert choose_files(
        gguf, gguf_file="q4/small.Q4_K_M.gguf", remote_code=False, max_bytes=910
    ) == [
        "config.json",
        "q4/small.Q4_K_M.gguf",
    ]
    with pytest.raises(NotFound):
        choose_files(gguf, gguf_file="small.F16.gguf", remote_code=False, max_bytes=10**9)
    with pytest.raises(FailedPrecondition) as caught:
        choose_files(gguf, gguf_file="", remote_code=False, max_bytes=10**9)
    assert caught.value.reason == "NO_LOADABLE_WEIGHTS"
    with pytest.raises(FailedPrecondition) as caught:
        choose_files([("model.safetensors", None)], gguf_file="", remote_code=False, max_bytes=1)
    assert caught.value.reason == "DOWNLOAD_SIZE_UNKNOWN"


def test_settings_refuse_remote_code_models_without_the_switch_and_bad_remote_urls():
    with pytest.raises(ValidationError, match="RAGMESH_LLM_TRUST_REMOTE_CODE"):
        LlmSettings(trust_remote_code_repos=["acme/model"])
    with pytest.raises(ValidationError, match="http"):
        LlmSettings(remote_base_urls=["ftp://files.example"])
    settings = LlmSettings(remote_base_urls=[" http://vllm:8000/v1/ "])
    assert settings.remote_base_urls == ["http://vllm:8000/v1"]


@pytest.fixture(scope="module")
async def llama(models_dir):
    """The packaged SmolLM2 GGUF on llama.cpp: four sequences in a 256-token KV cache."""
    loaded = await _load("llama_cpp", models_dir, max_batch=4, max_queue=4)
    yield loaded
    await loaded.close()


async def test_llama_cpp_renders_and_counts_as_transformers_does(llama, smollm_tokenizer):
    """The chat template comes from the GGUF's tokenizer.chat_template either way."""
    conversations = [
        [Message("user", "What is the capital of France?")],
        [
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello! 👋"),
            Message("user", "And <|im_start|> in a message?"),
        ],
    ]
    for messages in conversations:
        rendered = smollm_tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert llama.encode_chat(messages) == smollm_tokenizer.encode(
            rendered, add_special_tokens=False
        )
    text = "héllo 🌍 wörld<|im_end|>\n日本語"
    assert llama.encode(text) == smollm_tokenizer.encode(text, add_special_tokens=False)


async def test_llama_cpp_requests_wait_for_room_in_the_kv_cache(llama):
    # 4 prompt tokens and 200 new ones each: two do not fit the 256-token cache together,
    # though the batch has four slots.
    ids = llama.encode("Once upon a time")
    params = GenerationParams(temperature=0.0, max_new_tokens=200)
    events = []

    async def run(name: str) -> Result:
        async for event in llama.stream(Job(name, params, prompt_ids=ids)):
            events.append((name, type(event)))
        return event

    first, second = await asyncio.gather(run("a"), run("b"))
    assert events.index(("a", Result)) < events.index(("b", Delta))
    # The second runs in the cells the first freed, and says the same.
    assert second.text == first.text


def test_the_backend_follows_the_format_unless_the_options_name_one(models_dir):
    settings = LlmSettings(models_dir=models_dir)

    def backend(model: str, **options) -> str:
        resolved = catalogue.resolve(model, "", models_dir, settings.resolved_model_roots)
        return check_options(LoadOptions(model=model, **options), settings, resolved)[0].backend

    assert backend("tiny") == "transformers"
    assert backend(catalogue.DEFAULT_MODEL_NAME) == "llama_cpp"
    assert backend(catalogue.DEFAULT_MODEL_NAME, backend="transformers") == "transformers"
    with pytest.raises(InvalidArgument):
        backend("tiny", backend="llama_cpp")


@pytest.fixture
def fake_cuda_node(monkeypatch):
    """A fake, as this node has no GPU: torch reports two CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_gguf_runs_on_the_gpu_when_the_node_has_one_and_the_build_offloads(
    fake_cuda_node, monkeypatch, tmp_path
):
    settings = LlmSettings(models_dir=tmp_path)
    model = catalogue.DEFAULT_MODEL_NAME
    resolved = catalogue.resolve(model, "", tmp_path, settings.resolved_model_roots)

    def device(**options) -> str:
        chosen, device = check_options(LoadOptions(model=model, **options), settings, resolved)
        assert chosen.backend == "llama_cpp"
        return device

    # A fake CUDA build of llama-cpp-python: every layer goes to the chosen GPU.
    monkeypatch.setattr(llama_backend.llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert (device(), device(device="cuda:1"), device(device="cpu")) == ("cuda:0", "cuda:1", "cpu")
    params = llama_backend.model_params("cuda:1")
    assert (params.n_gpu_layers, params.main_gpu, params.split_mode) == (
        -1,
        1,
        llama_backend.llama_cpp.LLAMA_SPLIT_MODE_NONE,
    )
    assert llama_backend.model_params("cpu").n_gpu_layers == 0
    # A CPU build (a fake here too): "auto" stays on the CPU, a CUDA device is refused.
    monkeypatch.setattr(llama_backend.llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert device() == "cpu"
    with pytest.raises(FailedPrecondition) as caught:
        device(device="cuda")
    assert caught.value.reason == "CUDA_UNAVAILABLE"


async def test_llama_cpp_stops_the_prefill_of_a_cancelled_request_at_the_next_chunk(
    models_dir, monkeypatch
):
    settings = LlmSettings(models_dir=models_dir)
    model = catalogue.DEFAULT_MODEL_NAME
    resolved = catalogue.resolve(model, "", models_dir, settings.resolved_model_roots)
    options, device = check_options(LoadOptions(model=model), settings, resolved)
    engine = await asyncio.to_thread(
        load_llama_cpp, resolved, options, device, max_batch=2, max_queue=2, max_context=2048
    )
    try:
        ids = engine.encode("the quick brown fox jumps over the lazy dog. " * 150)
        assert len(ids) > 2 * llama_backend._PREFILL_CHUNK
        job = Job("long", GenerationParams(max_new_tokens=8), prompt_ids=ids)
        chunks = []
        decode = engine.model._decode

        def cancelling_decode(entries):
            decode(entries)
            if len(entries) > 1:
                chunks.append(len(entries))
                engine.cancel(job.key)  # the caller cancels while the first chunk runs

        monkeypatch.setattr(engine.model, "_decode", cancelling_decode)
        events = await _drain(engine.stream(job))
        assert events[-1].finish_reason is FinishReason.CANCELLED
        assert chunks == [llama_backend._PREFILL_CHUNK]
        # Its sequence was freed: the next request runs.
        short = Job("next", GenerationParams(max_new_tokens=4), prompt_ids=ids[:8])
        assert (await _drain(engine.stream(short)))[-1].finish_reason in (
            FinishReason.LENGTH,
            FinishReason.EOS,
        )
    finally:
        await engine.close()


async def test_llama_cpp_keeps_a_running_stream_going_while_a_long_prompt_joins(
    models_dir, monkeypatch
):
    settings = LlmSettings(models_dir=models_dir)
    model = catalogue.DEFAULT_MODEL_NAME
    resolved = catalogue.resolve(model, "", models_dir, settings.resolved_model_roots)
    options, device = check_options(LoadOptions(model=model), settings, resolved)
    engine = await asyncio.to_thread(
        load_llama_cpp, resolved, options, device, max_batch=2, max_queue=2, max_context=2048
    )
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0}
    try:
        ids = engine.encode("the quick brown fox jumps over the lazy dog. " * 120)
        assert len(ids) > 2 * llama_backend._PREFILL_CHUNK
        long = Job("long", GenerationParams(max_new_tokens=8, **greedy), prompt_ids=ids)
        alone = await _drain(engine.stream(long))
        assert alone[-1].finish_reason is FinishReason.LENGTH

        # Every llama_decode, in order: a step gives each running sequence its next token.
        calls = []
        decode = engine.model._decode

        def logging_decode(entries):
            decode(entries)
            step = all(logits for *_, logits in entries)
            calls.append(("step" if step else "prefill", {seq for seq, *_ in entries}))

        monkeypatch.setattr(engine.model, "_decode", logging_decode)
        counting = engine.encode("1, 2, 3, 4, 5, 6, 7, 8, 9,")
        params = GenerationParams(max_new_tokens=400, **greedy)
        running = Job("running", params, prompt_ids=counting)
        stream = engine.stream(running)
        assert isinstance(await anext(stream), Delta)  # it is running
        (seq,) = calls[-1][1]
        arrival = len(calls)
        beside = await _drain(engine.stream(long))
        chunks = [i for i, (kind, _) in enumerate(calls) if kind == "prefill" and i >= arrival]
        assert len(chunks) >= 3
        # Between the long prompt's first chunk and its first token the stream advanced.
        got = sum(
            1 for kind, seqs in calls[chunks[0] : chunks[-1]] if kind == "step" and seq in seqs
        )
        assert got == len(chunks) - 1
        assert beside[-1] == replace(alone[-1], **_timings(beside[-1]))
        assert [e.text for e in beside[:-1]] == [e.text for e in alone[:-1]]
        assert engine.cancel(running.key)
        assert (await _drain(stream))[-1].finish_reason is FinishReason.CANCELLED
    finally:
        await engine.close()


def _timings(result: Result) -> dict:
    names = ("queue_seconds", "time_to_first_token_seconds", "total_seconds")
    return {name: getattr(result, name) for name in names}


async def test_llama_cpp_a_failed_step_sends_a_joining_prompt_back_to_the_queue(
    models_dir, monkeypatch
):
    settings = LlmSettings(models_dir=models_dir)
    model = catalogue.DEFAULT_MODEL_NAME
    resolved = catalogue.resolve(model, "", models_dir, settings.resolved_model_roots)
    options, device = check_options(LoadOptions(model=model), settings, resolved)
    engine = await asyncio.to_thread(
        load_llama_cpp, resolved, options, device, max_batch=2, max_queue=2, max_context=2048
    )
    engine.model = FaultInjectingLlama(engine.model)
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0}
    try:
        ids = engine.encode("the quick brown fox jumps over the lazy dog. " * 120)
        long = Job("long", GenerationParams(max_new_tokens=8, **greedy), prompt_ids=ids)
        alone = await _drain(engine.stream(long))
        prefill, armed = engine.model.prefill, []

        def failing_after_the_first_chunk(seq, chunk, start=0):
            prefill(seq, chunk, start)
            if 1 < len(chunk) < len(ids) and chunk == ids[: len(chunk)] and not armed:
                armed.append(seq)
                engine.model.fail_next_decode_step(RuntimeError("injected: step failed"))

        monkeypatch.setattr(engine.model, "prefill", failing_after_the_first_chunk)
        params = GenerationParams(max_new_tokens=400, **greedy)
        running = Job("running", params, prompt_ids=engine.encode("1, 2, 3, 4, 5,"))
        stream = engine.stream(running)
        assert isinstance(await anext(stream), Delta)
        # The step after the long prompt's first chunk fails: the running stream fails,
        # and the prompt, which had sent nothing, runs again from its start.
        beside = await _drain(engine.stream(long))
        assert armed
        with pytest.raises(Unavailable) as caught:
            await _drain(stream)
        assert caught.value.reason == "BATCH_FAILED"
        assert [e.text for e in beside[:-1]] == [e.text for e in alone[:-1]]
        assert beside[-1].finish_reason is FinishReason.LENGTH
        assert engine.failure == ""
    finally:
        await engine.close()
