"""In-process llama.cpp backend for GGUF models, on the shared batching loop.

The model runs from its GGUF file as shipped, quantized, through llama-cpp-python's
low-level API: one llama.cpp context whose batch carries one sequence id per request.
A request's prompt is decoded into its own sequence of the KV cache in chunks of at most
512 tokens, fewer while others run (a round's chunk is sized to about a quarter second),
each chunk followed by a step of the running requests, so those keep streaming while a
long prompt goes in; each step
decodes the next token of every running request in one llama_decode and samples each
from its own row of logits: the repetition penalty applied to the row, then the
best token, or a draw through the request's own sampler chain (temperature, top-k,
top-p, a seeded draw). The KV cache holds one context window shared by the batch: a
request joins once its prompt plus max_new_tokens fit beside the reservations of those
running, and waits in the queue until then.

Where a request's tokens land in that shared cache depends on the others (their cells are
freed as they finish), and the order of a sum over cells shifts the quantized model's
logits a little (by up to about half a logit on SmolLM2's Q4_1, against about one from
the full-precision model): a greedy or seeded request gives the same answer each time it
runs alone, but beside others a near-tie may go another way.
"""

import ctypes
import logging
import math
import os
from pathlib import Path

import llama_cpp
import numpy as np
import psutil
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.common.errors import FailedPrecondition
from services.llm.batching import BatchingEngine, Request
from services.llm.engine import EngineInfo, Message

_LOGGER = logging.getLogger(__name__)
_LLAMA_LOGGER = logging.getLogger("llama_cpp")

# llama_decode's answer when the KV cache has no room for the batch.
_NO_KV_SLOT = 1
# Prompt tokens per round of the batching loop at most, one llama_decode (llama.cpp's
# own micro-batch by default): the running requests step between two chunks, and a
# cancelled request stops its prefill at the next one.
_PREFILL_CHUNK = 512
# As llama_sampler_init_dist reads it: this seed means "draw one at random".
_RANDOM_SEED = 0xFFFFFFFF


# ggml's log levels (GGML_LOG_LEVEL_WARN, _ERROR) as Python's.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, _user_data) -> None:
    # llama.cpp logs every tensor at load; only warnings and errors go to the service log.
    if level in _LOG_LEVELS:
        _LLAMA_LOGGER.log(_LOG_LEVELS[level], "%s", text.decode(errors="replace").rstrip())


llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class DecodeError(RuntimeError):
    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode returned {code}")
        self.code = code


def gpu_offload() -> bool:
    """Whether this llama-cpp-python build can run layers on a GPU (a CUDA build)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, within its cgroup's CPU quota."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def model_params(device: str) -> llama_cpp.llama_model_params:
    """Every layer on the GPU for a CUDA device, none otherwise."""
    params = llama_cpp.llama_model_default_params()
    if device.startswith("cuda"):
        params.n_gpu_layers = -1
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        params.main_gpu = int(device.partition(":")[2] or 0)
    else:
        params.n_gpu_layers = 0
    return params


class LlamaModel:
    """A GGUF model and one llama.cpp context: tokens in, logits out. Not thread-safe."""

    def __init__(self, path: Path, device: str, max_context: int, n_seq: int, threads: int):
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params(device))
        if not self.model:
            raise ValueError(f"llama.cpp cannot load {path.name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # The model's window, or max_context when smaller: the KV cache holds that many.
        self.context_length = llama_cpp.llama_model_n_ctx_train(self.model)
        if max_context:
            self.context_length = min(self.context_length, max_context)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_length
        params.n_batch = min(self.context_length, 2048)
        params.n_seq_max = n_seq
        self.threads = params.n_threads = params.n_threads_batch = threads
        # Every sequence may use the whole window; the engine keeps their sum within it.
        params.kv_unified = True
        params.no_perf = True
        if not device.startswith("cuda"):
            # A CUDA build would otherwise still move the KV cache and big batches to a GPU.
            params.offload_kqv = params.op_offload = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ValueError(
                f"llama.cpp cannot make a context of {self.context_length} tokens for {path.name}"
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self._pieces: dict[int, bytes] = {}

    def token_text(self, token: int) -> str:
        """The text of a token; empty for none (LLAMA_TOKEN_NULL)."""
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode(errors="replace")

    def tokenize(self, text: str) -> list[int]:
        """Without BOS, special tokens in the text parsed, as transformers encodes."""
        data = text.encode()
        room = len(data) + 8
        tokens = (llama_cpp.llama_token * room)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, room, False, True)
        if count < 0:
            tokens = (llama_cpp.llama_token * -count)()
            count = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, -count, False, True
            )
        return tokens[:count]

    def piece(self, token: int) -> bytes:
        """The bytes of a token; none for control tokens."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if size < 0:
                buf = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -size, 0, False)
            cached = self._pieces[token] = buf.raw[:size]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def prefill(self, seq: int, ids: list[int], start: int = 0) -> None:
        """Decodes prompt tokens into sequence seq from position start, in chunks of up to
        n_batch tokens; the logits of the last one are then logits(-1)."""
        for at in range(0, len(ids), self.n_batch):
            chunk = ids[at : at + self.n_batch]
            last = at + len(chunk) == len(ids)
            self._decode(
                [
                    (seq, start + at + i, token, last and i == len(chunk) - 1)
                    for i, token in enumerate(chunk)
                ]
            )

    def step(self, entries: list[tuple[int, int, int]]) -> None:
        """Decodes one (sequence, position, token) per running sequence; row i's logits are
        then logits(i)."""
        self._decode([(seq, pos, token, True) for seq, pos, token in entries])

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for i, (seq, pos, token, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise DecodeError(code)

    def logits(self, index: int) -> np.ndarray:
        """The logits of the index-th entry of the last decode that asked for them."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def remove(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def clear(self, data: bool = True) -> None:
        """Empties the KV cache; with data its buffers are zeroed too."""
        llama_cpp.llama_memory_clear(self.memory, data)

    def device_bytes(self) -> int:
        """The weights plus the KV cache (f16 keys and values of every layer)."""
        layers = llama_cpp.llama_model_n_layer(self.model)
        heads = llama_cpp.llama_model_n_head(self.model)
        kv_width = llama_cpp.llama_model_n_embd(self.model) * llama_cpp.llama_model_n_head_kv(
            self.model
        )
        kv = 2 * 2 * layers * self.n_ctx * kv_width // max(heads, 1)
        return llama_cpp.llama_model_size(self.model) + kv

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class _Vocab:
    """What IncrementalDecoder needs of a tokenizer: ids to text, control tokens left out."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(map(self._model.piece, ids)).decode(errors="replace")


class _State:
    """A request's sequence id, the tokens it has in the KV cache, every distinct token it
    has seen (for the repetition penalty) and its sampler chain (None when greedy)."""

    def __init__(self, seq: int, sampler, n_vocab: int) -> None:
        self.seq = seq
        self.sampler = sampler
        self.position = 0
        self._known = np.zeros(n_vocab, dtype=bool)
        self.seen: list[int] = []

    def see(self, tokens) -> None:
        for token in tokens:
            if not self._known[token]:
                self._known[token] = True
                self.seen.append(token)

    def free(self) -> None:
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)


class LlamaCppEngine(BatchingEngine):
    """Runs a GGUF model with llama.cpp; all model calls happen on its own decode thread."""

    def __init__(self, model: LlamaModel, info: EngineInfo, max_batch: int, max_queue: int):
        eos = frozenset(t for t in range(model.n_vocab) if model.is_eog(t))
        super().__init__(_Vocab(model), eos, info, max_batch, max_queue)
        self.model = model
        # A base model may have no template: it serves Generate, and Chat says why not.
        template = llama_cpp.llama_model_chat_template(model.model, None)
        self._template = None
        if template:
            self._template = Jinja2ChatFormatter(
                template.decode(),
                eos_token=model.token_text(llama_cpp.llama_vocab_eos(model.vocab)),
                bos_token=model.token_text(llama_cpp.llama_vocab_bos(model.vocab)),
            )
        self._free_seqs = list(range(max_batch))
        self._prefill_chunk = min(model.n_batch, _PREFILL_CHUNK)
        self._start_thread()

    def memory_bytes(self) -> int:
        if self.info.device.startswith("cuda"):
            return self.model.device_bytes()
        return psutil.Process().memory_info().rss

    def encode(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        if self._template is None:
            raise FailedPrecondition(
                f"{self.info.name} has no chat template (tokenizer.chat_template in its "
                "GGUF); use Generate with a prompt, or load an instruct model",
                reason="NO_CHAT_TEMPLATE",
            )
        rendered = self._template(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        return self.model.tokenize(rendered.prompt)

    # -- hooks of the batching loop ----------------------------------------------------------

    def _fits(self, request: Request, joining: list[Request]) -> bool:
        if not self._active and not joining:
            return True  # alone it runs; one too long for the cache fails on its own
        reserved = sum(_reservation(r) for r in [*self._active, *joining])
        return reserved + _reservation(request) <= self.model.n_ctx

    def _prefill(self, request: Request, count: int) -> int | None:
        ids = request.job.prompt_ids
        state: _State = request.state
        if state is None:
            state = _State(self._free_seqs.pop(), self._sampler(request), self.model.n_vocab)
            request.state = state
            state.see(ids)
        start = request.prefilled
        self.model.prefill(state.seq, ids[start : start + count], start)
        state.position = start + count
        if state.position < len(ids):
            return None
        return self._sample(request, None, -1)

    def _abandon(self, request: Request) -> None:
        self._release_state(request)

    def _forward(self) -> None:
        self.model.step([(r.state.seq, r.state.position, r.next_token) for r in self._active])
        for request in self._active:
            request.state.position += 1

    def _sample(self, request: Request, out: None, row: int) -> int:
        """Penalises the seen tokens in the row's logits (in place, as the transformers
        backend does), then takes the best token or draws with the request's chain."""
        state: _State = request.state
        params = request.job.params
        logits = self.model.logits(row)
        if np.isnan(logits).any():
            raise FloatingPointError("the model produced NaN logits")
        if params.repetition_penalty != 1.0:
            seen = np.array(state.seen)
            scores = logits[seen]
            logits[seen] = np.where(
                scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty
            )
        if state.sampler is None:
            token = int(logits.argmax())
        else:
            token = llama_cpp.llama_sampler_sample(state.sampler, self.model.ctx, row)
        state.see((token,))
        return token

    def _drop(self, keep: list[int], gone: list[Request]) -> None:
        for request in gone:
            self._release_state(request)
        if not keep and not self._joining:
            # An empty cache starts again from its first cell: a request that runs alone
            # always has the same layout, hence the same logits.
            self.model.clear(data=False)

    def _reset(self, running: list[Request]) -> None:
        for request in running:
            if request.state is not None:
                request.state.free()
                request.state = None
        self.model.clear()
        self._free_seqs = list(range(self._max_batch))

    def _probe(self) -> None:
        seq = self._free_seqs[-1]
        try:
            self.model.prefill(seq, [0])
            if np.isnan(self.model.logits(-1)).any():
                raise FloatingPointError("the model produces NaN logits")
        finally:
            self.model.remove(seq)

    def _out_of_memory(self, exc: Exception) -> bool:
        return isinstance(exc, DecodeError) and exc.code == _NO_KV_SLOT

    def _release(self) -> None:
        self.model.close()

    def _release_state(self, request: Request) -> None:
        state: _State = request.state
        if state is None:
            return
        request.state = None
        self.model.remove(state.seq)
        state.free()
        self._free_seqs.append(state.seq)

    def _sampler(self, request: Request):
        """The request's chain: temperature, top-k, top-p and a draw seeded by the request
        (the transformers backend's order); none for greedy decoding."""
        params = request.job.params
        if params.greedy:
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        if params.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_dist(request.seed % _RANDOM_SEED))
        return chain


def _reservation(request: Request) -> int:
    """KV cells a request may fill: its prompt and every token it may generate."""
    return len(request.job.prompt_ids) + request.job.params.max_new_tokens
