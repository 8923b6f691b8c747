"""In-process transformers backend: one decode thread batching every running request per step.

Requests join the running batch at the next step (their prompt is prefilled alone and its
KV cache left-padded into the batch) and leave it as soon as they finish or are cancelled,
so concurrent requests share forward passes without waiting for each other.

A failure that belongs to one request (its prefill, its logits) fails that request only.
A failure of a batched step fails the running requests and restarts the engine: fresh
batch state, a probe forward pass, and the waiting requests keep their place. While the
probe fails the engine reports why in `failure` and refuses new requests.
"""

import asyncio
import gc
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from services.llm.decoding import IncrementalDecoder
from services.llm.engine import Delta, EngineInfo, FinishReason, Job, Message, Result, error_text

_LOGGER = logging.getLogger(__name__)

# Seconds between probes of an engine that keeps failing after a restart, at most.
_MAX_PROBE_INTERVAL = 30.0


@dataclass(eq=False)
class _Request:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    decoder: IncrementalDecoder
    generator: torch.Generator
    submitted: float
    seen: torch.Tensor | None = None  # prompt + generated ids, for the repetition penalty
    admitted: float = 0.0
    first_token: float = 0.0
    generated: int = 0
    next_token: int = 0
    cancelled: bool = False
    done: bool = False
    extra: dict = field(default_factory=dict)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class LocalEngine:
    """Runs a loaded causal LM; all model calls happen on its own decode thread."""

    def __init__(self, model, tokenizer, info: EngineInfo, max_batch: int, max_queue: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._eos = _eos_ids(model, tokenizer)
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._active: list[_Request] = []
        # Every accepted request not yet finished (waiting, joining or in the batch), by key.
        self._by_key: dict[tuple[str, str, str], _Request] = {}
        self._closing = False
        self._draining = False
        self.failure = ""
        self.on_health_change: Callable[[], None] | None = None
        # Batch state, touched only by the decode thread.
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name=f"decode-{info.name}", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------

    def memory_bytes(self) -> int:
        if self.info.device.startswith("cuda"):
            return int(torch.cuda.memory_allocated(torch.device(self.info.device)))
        return psutil.Process().memory_info().rss

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    async def stream(self, job: Job):
        """Yields Delta events, then one Result; a cancel of the caller cancels the request."""
        request = self._submit(job)
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, ServiceError):
                    raise event
                yield event
                if isinstance(event, Result):
                    return
        finally:
            if not request.done:
                self.cancel(job.key)

    def cancel(self, key: tuple[str, str, str]) -> bool:
        with self._cv:
            request = self._by_key.get(key)
            if request is None or request.done:
                return False
            request.cancelled = True
            self._cv.notify()
            return True

    async def close(self, drain: bool = False) -> None:
        """Stops the decode thread (after running requests finish when drain) and frees memory."""
        with self._cv:
            if drain:
                self._draining = True
            else:
                self._closing = True
                for request in [*self._pending, *self._active]:
                    request.cancelled = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self.model = None
        self._cache = None
        _free_memory()
        _LOGGER.info("engine %s closed", self.info.name)

    def _submit(self, job: Job) -> _Request:
        prompt_ids = job.prompt_ids or []
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty", field="prompt")
        seed = job.params.seed if job.params.seed is not None else random.getrandbits(63)
        request = _Request(
            job=job,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            decoder=IncrementalDecoder(self.tokenizer, job.params.stop_sequences),
            generator=torch.Generator(device=self.model.device).manual_seed(seed),
            submitted=time.perf_counter(),
        )
        with self._cv:
            if self.failure:
                raise Unavailable(
                    "the model is restarting after a failure; retry shortly",
                    reason="ENGINE_RESTARTING",
                )
            if self._closing or self._draining:
                raise ResourceExhausted("the model is being replaced or unloaded; retry")
            if job.key in self._by_key:
                raise InvalidArgument(
                    f"request {job.request_id} is already running", field="request_id"
                )
            # Whatever the batch holds, at most max_queue requests wait beyond its slots.
            if len(self._by_key) >= self._max_batch + self._max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({self._max_queue} waiting); retry later",
                    reason="QUEUE_FULL",
                )
            self._pending.append(request)
            self._by_key[job.key] = request
            self._cv.notify()
        return request

    # -- the decode thread ---------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._next_round():
                        return
                except Exception as exc:
                    _LOGGER.exception("a decode step of %s failed; restarting", self.info.name)
                    self._restart(exc)

    def _restart(self, exc: Exception) -> None:
        """Fails the running requests, drops the batch state and probes until the model works."""
        self._set_failure(f"a decode step failed ({error_text(exc)}); restarting")
        running, self._active = self._active, []
        self._cache = self._mask = None
        error = Unavailable(
            "generation failed on the server mid-stream and the model restarted; retry",
            reason="BATCH_FAILED",
        )
        for request in running:
            self._finish(request, FinishReason.CANCELLED, error=error)
        _free_memory()
        interval = 1.0
        while True:
            try:
                self._probe()
            except Exception as probe_exc:
                _LOGGER.exception("%s still fails after a restart", self.info.name)
                self._set_failure(f"the model fails after a restart ({error_text(probe_exc)})")
                self._fail_waiting()
                with self._cv:
                    if self._closing or self._draining:
                        return
                    self._cv.wait(interval)
                interval = min(interval * 2, _MAX_PROBE_INTERVAL)
                continue
            _LOGGER.info("%s serves again after a restart", self.info.name)
            self._set_failure("")
            return

    def _probe(self) -> None:
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        if torch.isnan(logits).any():
            raise FloatingPointError("the model produces NaN logits")

    def _fail_waiting(self) -> None:
        with self._cv:
            waiting = list(self._pending)
            self._pending.clear()
        error = Unavailable(
            "the model cannot generate after a failure; the operator has the log",
            reason="ENGINE_FAILED",
        )
        for request in waiting:
            self._finish(request, FinishReason.CANCELLED, error=error)

    def _set_failure(self, failure: str) -> None:
        with self._cv:
            changed, self.failure = self.failure != failure, failure
        if changed and self.on_health_change is not None:
            self.on_health_change()

    def _next_round(self) -> bool:
        with self._cv:
            while not (self._pending or self._active or self._closing or self._draining):
                self._cv.wait()
            if (self._closing or self._draining) and not self._pending and not self._active:
                return False
            admitted = []
            while self._pending and len(self._active) + len(admitted) < self._max_batch:
                admitted.append(self._pending.popleft())
            for request in [r for r in self._pending if r.cancelled]:
                self._pending.remove(request)
                self._finish(request, FinishReason.CANCELLED)
        for index, request in enumerate(admitted):
            try:
                if request.cancelled:
                    self._finish(request, FinishReason.CANCELLED)
                else:
                    self._prefill(request)
            except Exception:
                # Those not admitted yet wait at the front for the restarted engine.
                with self._cv:
                    self._pending.extendleft(reversed(admitted[index + 1 :]))
                raise
        self._retire()
        if self._active:
            self._decode_step()
            self._retire()
        return True

    def _prefill(self, request: _Request) -> None:
        """Runs the prompt alone; a failure here is this request's only."""
        request.admitted = time.perf_counter()
        device = self.model.device
        ids = torch.tensor([request.job.prompt_ids], device=device)
        request.seen = ids[0]
        cache = DynamicCache()
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token = self._sample(request, out.logits[0, -1])
        except Exception as exc:
            self._finish(request, FinishReason.CANCELLED, error=self._request_error(request, exc))
            return
        # In the batch before joining it: a failed join fails it with the batch.
        self._active.append(request)
        self._join_batch(cache, torch.ones_like(ids))
        self._advance(request, token)

    def _join_batch(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Left-pads the batch's or the newcomer's KV cache so their lengths match, then stacks."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])

    def _decode_step(self) -> None:
        device = self.model.device
        tokens = torch.tensor([[r.next_token] for r in self._active], device=device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones_like(tokens)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        for row, request in enumerate(self._active):
            if not request.cancelled:
                try:
                    token = self._sample(request, logits[row])
                except Exception as exc:
                    request.extra["error"] = self._request_error(request, exc)
                    continue
                self._advance(request, token)

    def _advance(self, request: _Request, token: int) -> None:
        try:
            self._accept(request, token)
        except Exception as exc:
            request.extra["error"] = self._request_error(request, exc)

    def _request_error(self, request: _Request, exc: Exception) -> ServiceError:
        """What the caller of a request that failed alone gets; the operator gets the log."""
        _LOGGER.error(
            "request %s failed on %s", request.job.request_id, self.info.name, exc_info=exc
        )
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            _free_memory()
            return ResourceExhausted(
                "the model ran out of memory on this request; retry later or with a shorter prompt",
                reason="OUT_OF_MEMORY",
            )
        return ServiceError(
            "generation of this request failed on the server; quote the request id to the operator",
            reason="GENERATION_FAILED",
        )

    def _sample(self, request: _Request, logits: torch.Tensor) -> int:
        params = request.job.params
        logits = logits.float()
        if torch.isnan(logits).any():
            raise FloatingPointError("the model produced NaN logits")
        if params.repetition_penalty != 1.0:
            seen = request.seen
            scores = logits[seen]
            scores = torch.where(
                scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty
            )
            logits = logits.scatter(0, seen, scores)
        if params.greedy:
            return int(logits.argmax())
        logits = logits / params.temperature
        if 0 < params.top_k < logits.shape[0]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probs = ordered.softmax(dim=0)
            drop = probs.cumsum(dim=0) - probs > params.top_p
            logits = logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probs = F.softmax(logits, dim=0)
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _accept(self, request: _Request, token: int) -> None:
        request.generated += 1
        if request.generated == 1:
            request.first_token = time.perf_counter()
        request.next_token = token
        request.seen = torch.cat([request.seen, request.seen.new_tensor([token])])
        if token in self._eos:
            request.extra["finish"] = FinishReason.EOS
            return
        delta = request.decoder.add(token)
        if delta:
            request.emit(Delta(delta))
        if request.decoder.stopped:
            request.extra["finish"] = FinishReason.STOP
        elif request.generated >= request.job.params.max_new_tokens:
            request.extra["finish"] = FinishReason.LENGTH

    def _retire(self) -> None:
        """Removes finished and cancelled rows from the batch and trims all-padding columns."""
        keep = []
        for row, request in enumerate(self._active):
            error = request.extra.get("error")
            reason = FinishReason.CANCELLED if request.cancelled else request.extra.get("finish")
            if error is not None:
                self._finish(request, FinishReason.CANCELLED, error=error)
            elif reason is None:
                keep.append(row)
            else:
                self._finish(request, reason)
        if len(keep) == len(self._active):
            return
        self._active = [self._active[row] for row in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _finish(self, request: _Request, reason: FinishReason, error=None) -> None:
        if request.done:
            return
        request.done = True
        with self._cv:
            self._by_key.pop(request.job.key, None)
        if reason is not FinishReason.CANCELLED:
            tail = request.decoder.flush()
            if tail:
                request.emit(Delta(tail))
        now = time.perf_counter()
        admitted = request.admitted or now
        completion = request.generated - (1 if reason is FinishReason.EOS else 0)
        result = Result(
            finish_reason=reason,
            text=request.decoder.text[: request.decoder.sent],
            prompt_tokens=len(request.job.prompt_ids),
            completion_tokens=max(0, completion),
            queue_seconds=admitted - request.submitted,
            time_to_first_token_seconds=(request.first_token or now) - request.submitted,
            total_seconds=now - request.submitted,
            model=self.info.name,
        )
        request.emit(error if error is not None else result)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
