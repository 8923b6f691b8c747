"""The continuous-batching loop of the in-process backends (transformers, llama.cpp).

One decode thread per engine. Requests wait in a bounded queue, join the running batch
once their prompt is in and leave it as soon as they finish or are cancelled, so
concurrent requests share forward passes without waiting for each other. A backend may
prefill prompts in chunks (up to `_prefill_chunk` prompt tokens): each round then runs
one chunk's worth of the joining requests' prompts, then one decode step of the running
ones, so a long prompt does not stall the streams already running. While requests run,
a round's chunk is sized from the prefill's measured cost to take about
_PREFILL_SLICE_SECONDS, their gap between two tokens (at least _MIN_PREFILL_CHUNK tokens).

A request that comes with a deadline is admitted only if it can get its first token in
time as far as the measured rates and answer lengths tell (see `expected_waits`); one
that cannot is refused at once with RESOURCE_EXHAUSTED `DEADLINE_UNREACHABLE`, so its
caller may retry later or with a longer deadline instead of waiting in the queue until
its deadline passes. Each round applies the same rule to the queue, so a request
admitted on rates that have grown since is refused as soon as its wait no longer fits,
not at its deadline. A request whose deadline passes before its first token leaves the
queue (or stops its prefill) at the next round: gRPC cancels its call, and the loop
checks the deadline itself as well.

A failure that belongs to one request (its prompt, its logits) fails that request only.
A failure of a batched step fails the running requests and restarts the engine: fresh
batch state, a probe forward pass, and the waiting requests keep their place. While the
probe fails the engine reports why in `failure` and refuses new requests.

A backend subclasses BatchingEngine and runs the model in its hooks, all of them called
on the decode thread.
"""

import asyncio
import contextlib
import heapq
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.metrics import QueueFigures
from services.llm.decoding import IncrementalDecoder
from services.llm.engine import Delta, EngineInfo, FinishReason, Job, Result, error_text

_LOGGER = logging.getLogger(__name__)

# Seconds between probes of an engine that keeps failing after a restart, at most.
_MAX_PROBE_INTERVAL = 30.0
# While requests run, the seconds a round's prefill aims at, and its fewest prompt tokens.
_PREFILL_SLICE_SECONDS = 0.25
_MIN_PREFILL_CHUNK = 16
# Weight of the newest measurement in the running averages of prefill and decode costs.
_SMOOTHING = 0.3
# The latest finished answers whose mean length admission expects of the requests ahead.
_LENGTH_WINDOW = 64


@dataclass(eq=False)
class Request:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    decoder: IncrementalDecoder
    seed: int
    submitted: float
    admitted: float = 0.0
    first_token: float = 0.0
    # Prompt tokens in the cache, while the request joins.
    prefilled: int = 0
    generated: int = 0
    next_token: int = 0
    cancelled: bool = False
    done: bool = False
    finish: FinishReason | None = None
    error: ServiceError | None = None
    # What the backend keeps for this request (sampler, cache, sequence id).
    state: object = None

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class BatchingEngine:
    """Queue, batch membership, cancellation and restarts; the model runs in the hooks."""

    # Prompt tokens prefilled per round of the loop at most, over all joining requests;
    # None runs each prompt whole.
    _prefill_chunk: int | None = None

    def __init__(
        self, tokenizer, eos: frozenset[int], info: EngineInfo, max_batch: int, max_queue: int
    ) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self._eos = eos
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        # Admitted requests whose prompts are going in, in arrival order (decode thread).
        self._joining: deque[Request] = deque()
        # The batch, touched only by the decode thread; hooks see rows in this order.
        self._active: list[Request] = []
        # Every accepted request not yet finished (waiting, joining or in the batch), by key.
        self._by_key: dict[tuple[str, str, str], Request] = {}
        self._closing = False
        self._draining = False
        self.failure = ""
        self.on_health_change: Callable[[], None] | None = None
        # Decode steps run, the sequences they advanced, and the most at once (metrics).
        self._steps = 0
        self._stepped_rows = 0
        self._most_rows = 0
        # Running averages (0 before the first measurement), written by the decode thread:
        # the seconds per prompt token of the recent prefills, and the seconds a round that
        # steps the batch takes beside its prefill.
        self._prompt_token_seconds = 0.0
        self._step_seconds = 0.0
        # What each joining or running request holds its slot for: (prompt tokens left to
        # prefill, max_new_tokens, tokens generated); the decode thread publishes it under
        # the lock each round, for admission.
        self._held: list[tuple[int, int, int]] = []
        # Tokens generated by each of the latest requests that ended on EOS, a stop
        # sequence or max_new_tokens (not cancelled or failed), under the lock.
        self._lengths: deque[int] = deque(maxlen=_LENGTH_WINDOW)

    def _start_thread(self) -> None:
        """Starts the decode thread; subclasses call it once their model is in place."""
        self._thread = threading.Thread(
            target=self._run, name=f"decode-{self.info.name}", daemon=True
        )
        self._thread.start()

    # -- backend hooks, on the decode thread -----------------------------------------------

    def _prefill(self, request: Request, count: int) -> int | None:
        """Runs the next count prompt tokens of the request (from request.prefilled) and,
        once its whole prompt is in, samples and returns its first token; None while more
        remains. A raise fails this request."""
        raise NotImplementedError

    def _abandon(self, request: Request) -> None:
        """Frees what a request that leaves before joining the batch holds."""

    def _join(self, request: Request) -> None:
        """Adds a prefilled request to the batch state; a raise fails the batch."""

    def _forward(self) -> object:
        """One forward pass over the batch's next tokens; a raise fails the batch."""
        raise NotImplementedError

    def _sample(self, request: Request, out: object, row: int) -> int:
        """The next token of the request at row of _forward's output; a raise fails it."""
        raise NotImplementedError

    def _drop(self, keep: list[int], gone: list[Request]) -> None:
        """Shrinks the batch state to the rows in keep; gone left the batch."""

    def _reset(self, running: list[Request]) -> None:
        """Drops all batch state after a failed step; running were in the batch."""

    def _probe(self) -> None:
        """A forward pass outside the batch; raises while the model cannot run."""
        raise NotImplementedError

    def _fits(self, request: Request, joining: list[Request]) -> bool:
        """Whether the request may join the batch now, beside those running and joining."""
        return True

    def _out_of_memory(self, exc: Exception) -> bool:
        """Whether exc means the device ran out of memory (after freeing what it can)."""
        return False

    def _thread_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _release(self) -> None:
        """Frees the model once the decode thread has stopped."""

    # -- called from the event loop --------------------------------------------------------

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

    def queue_figures(self) -> QueueFigures:
        """Requests waiting for a slot; each decode step is a batch of the rows it advanced."""
        return QueueFigures(
            depth=len(self._pending),
            batches=self._steps,
            batched_items=self._stepped_rows,
            max_batch_size=self._most_rows,
        )

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
                for request in [*self._pending, *self._joining, *self._active]:
                    request.cancelled = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self._release()
        _LOGGER.info("engine %s closed", self.info.name)

    def _submit(self, job: Job) -> Request:
        if not job.prompt_ids:
            raise InvalidArgument("the prompt is empty", field="prompt")
        request = Request(
            job=job,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            decoder=IncrementalDecoder(self.tokenizer, job.params.stop_sequences),
            seed=job.params.seed if job.params.seed is not None else random.getrandbits(63),
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
                    metadata={"limit": str(self._max_queue)},
                )
            if job.deadline is not None:
                self._admit_by_deadline(request, job.deadline)
            self._pending.append(request)
            self._by_key[job.key] = request
            self._cv.notify()
        return request

    def _admit_by_deadline(self, request: Request, deadline: float) -> None:
        """Under the lock: refuses the request when its expected wait for a first token,
        behind the batch and the queue, exceeds the time left before its deadline.

        The rule is lenient: the estimate (`expected_waits`) counts only the prefill and
        decode work ahead at the measured rates, each request ahead generating as many
        tokens as the latest finished answers did on average (never more than its
        max_new_tokens), and the request is refused only when that is more than all of
        its remaining time. The mean, not a high percentile: the wait adds up the
        answers of all the requests ahead, whose sum the mean estimates, and a
        percentile for each would overstate it. Until a request has finished, each one
        ahead runs to its max_new_tokens (admitting blindly under a burst would let the
        queue grow past its deadlines, and the first answer ends soon); until both rates
        are measured every request is admitted. The loop applies the same rule to the
        queue each round (`_drop_unreachable`), as the measurements change."""
        if not self._measured():
            return
        ahead = [r for r in self._pending if not r.cancelled]
        wait = self._expected_waits([*ahead, request])[-1]
        remaining = deadline - time.monotonic()
        if wait > remaining:
            raise self._unreachable(wait, remaining, len(ahead))

    def _measured(self) -> bool:
        return bool(self._prompt_token_seconds and self._step_seconds)

    def _expected_waits(self, queued: list[Request]) -> list[float]:
        """Under the lock: the expected wait of each of the queued requests, in order."""
        return expected_waits(
            self._held,
            [(len(r.job.prompt_ids), r.job.params.max_new_tokens) for r in queued],
            self._max_batch,
            self._prompt_token_seconds,
            self._step_seconds,
            self._busy_chunk(),
            sum(self._lengths) / len(self._lengths) if self._lengths else None,
        )

    def _unreachable(self, wait: float, remaining: float, ahead: int) -> ResourceExhausted:
        remaining = max(remaining, 0.0)
        return ResourceExhausted(
            f"the expected wait for a first token is {wait:.1f} s "
            f"({len(self._held)} in the batch, {ahead} queued ahead) and the deadline is "
            f"in {remaining:.1f} s; retry later or with a longer deadline",
            reason="DEADLINE_UNREACHABLE",
            metadata={
                "expected_wait_seconds": f"{wait:.1f}",
                "deadline_seconds": f"{remaining:.1f}",
            },
        )

    # -- the decode thread -----------------------------------------------------------------

    def _run(self) -> None:
        with self._thread_context():
            while True:
                try:
                    if not self._next_round():
                        return
                except Exception as exc:
                    _LOGGER.exception("a decode step of %s failed; restarting", self.info.name)
                    self._restart(exc)

    def _restart(self, exc: Exception) -> None:
        """Fails the running requests, drops the batch state and probes until the model works.
        Joining requests have sent nothing yet: they wait at the front of the queue, to
        prefill again."""
        self._set_failure(f"a decode step failed ({error_text(exc)}); restarting")
        running, self._active = self._active, []
        joining, self._joining = list(self._joining), deque()
        self._reset([*running, *joining])
        for request in joining:
            request.state, request.prefilled = None, 0
        with self._cv:
            self._pending.extendleft(reversed(joining))
        error = Unavailable(
            "generation failed on the server mid-stream and the model restarted; retry",
            reason="BATCH_FAILED",
        )
        for request in running:
            self._finish(request, FinishReason.CANCELLED, error=error)
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
            while not (
                self._pending or self._joining or self._active or self._closing or self._draining
            ):
                self._cv.wait()
            if (self._closing or self._draining) and not (
                self._pending or self._joining or self._active
            ):
                return False
            started = time.perf_counter()
            now = time.monotonic()
            for request in [r for r in self._pending if r.cancelled or _expired(r, now)]:
                self._pending.remove(request)
                self._finish(request, FinishReason.CANCELLED, error=_late_error(request))
            while (
                self._pending
                and len(self._active) + len(self._joining) < self._max_batch
                and self._fits(self._pending[0], list(self._joining))
            ):
                request = self._pending.popleft()
                request.admitted = time.perf_counter()
                self._joining.append(request)
            self._publish_held()
            self._drop_unreachable()
        prefill_seconds = self._prefill_round()
        self._retire()
        stepped = bool(self._active)
        if stepped:
            self._decode_step()
            self._retire()
        with self._cv:
            self._publish_held()
        if stepped:
            # What the round cost beside its prefill: the step and all the loop's own work
            # (and its waits for the lock and the GIL), which a busy process makes longer.
            self._step_seconds = _average(
                self._step_seconds, time.perf_counter() - started - prefill_seconds
            )
        return True

    def _drop_unreachable(self) -> None:
        """Under the lock: refuses the first queued request whose deadline its expected
        wait now exceeds (admission's rule, at the rates measured since). One a round:
        each one refused shortens the wait of those behind it."""
        queued = [r for r in self._pending if not r.cancelled]
        if not (self._measured() and any(r.job.deadline is not None for r in queued)):
            return
        now = time.monotonic()
        waits = self._expected_waits(queued)
        for ahead, (request, wait) in enumerate(zip(queued, waits, strict=True)):
            deadline = request.job.deadline
            if deadline is not None and wait > deadline - now:
                self._pending.remove(request)
                self._finish(
                    request,
                    FinishReason.CANCELLED,
                    error=self._unreachable(wait, deadline - now, ahead),
                )
                return

    def _publish_held(self) -> None:
        """Updates what admission reads of the batch's slots; under the lock."""
        self._held = [
            (len(r.job.prompt_ids) - r.prefilled, r.job.params.max_new_tokens, r.generated)
            for r in [*self._joining, *self._active]
            if not r.cancelled
        ]

    def _prefill_round(self) -> float:
        """Runs up to the budget's prompt tokens of the joining requests, oldest first;
        each whose prompt is in joins the batch with its first token. Returns the
        seconds the prefills took."""
        now = time.monotonic()
        for request in [r for r in self._joining if r.cancelled or _expired(r, now)]:
            self._joining.remove(request)
            self._abandon(request)
            self._finish(request, FinishReason.CANCELLED, error=_late_error(request))
        budget = self._round_budget()
        spent = 0.0
        while self._joining and (budget is None or budget > 0):
            request = self._joining[0]
            remaining = len(request.job.prompt_ids) - request.prefilled
            count = remaining if budget is None else min(budget, remaining)
            started = time.perf_counter()
            try:
                token = self._prefill(request, count)
            except Exception as exc:
                spent += time.perf_counter() - started
                self._joining.popleft()
                self._abandon(request)
                self._finish(
                    request, FinishReason.CANCELLED, error=self._request_error(request, exc)
                )
                continue
            request.prefilled += count
            took = time.perf_counter() - started
            spent += took
            self._prompt_token_seconds = _average(self._prompt_token_seconds, took / count)
            if budget is not None:
                budget -= count
            if token is None:
                continue
            self._joining.popleft()
            # In the batch before joining it: a failed join fails it with the batch.
            self._active.append(request)
            self._join(request)
            self._accept(request, token)
        return spent

    def _round_budget(self) -> int | None:
        """Prompt tokens this round may prefill: a whole chunk while nothing runs, else
        `_busy_chunk`."""
        if self._prefill_chunk is None or not self._active:
            return self._prefill_chunk
        return self._busy_chunk()

    def _busy_chunk(self) -> int | None:
        """Prompt tokens a round prefills beside running requests: what takes about
        _PREFILL_SLICE_SECONDS at the measured cost; None runs each prompt whole."""
        if self._prefill_chunk is None:
            return None
        if not self._prompt_token_seconds:
            return _MIN_PREFILL_CHUNK
        fitting = int(_PREFILL_SLICE_SECONDS / self._prompt_token_seconds)
        return max(_MIN_PREFILL_CHUNK, min(self._prefill_chunk, fitting))

    def _decode_step(self) -> None:
        out = self._forward()
        self._steps += 1
        self._stepped_rows += len(self._active)
        self._most_rows = max(self._most_rows, len(self._active))
        for row, request in enumerate(self._active):
            if request.cancelled:
                continue
            try:
                token = self._sample(request, out, row)
            except Exception as exc:
                request.error = self._request_error(request, exc)
                continue
            self._accept(request, token)

    def _request_error(self, request: Request, exc: Exception) -> ServiceError:
        """What the caller of a request that failed alone gets; the operator gets the log."""
        _LOGGER.error(
            "request %s failed on %s", request.job.request_id, self.info.name, exc_info=exc
        )
        if self._out_of_memory(exc):
            return ResourceExhausted(
                "the model ran out of memory on this request; retry later or with a shorter prompt",
                reason="OUT_OF_MEMORY",
            )
        return ServiceError(
            "generation of this request failed on the server; quote the request id to the operator",
            reason="GENERATION_FAILED",
        )

    def _accept(self, request: Request, token: int) -> None:
        try:
            request.generated += 1
            if request.generated == 1:
                request.first_token = time.perf_counter()
            request.next_token = token
            if token in self._eos:
                request.finish = FinishReason.EOS
                return
            delta = request.decoder.add(token)
            if delta:
                request.emit(Delta(delta))
            if request.decoder.stopped:
                request.finish = FinishReason.STOP
            elif request.generated >= request.job.params.max_new_tokens:
                request.finish = FinishReason.LENGTH
        except Exception as exc:
            request.error = self._request_error(request, exc)

    def _retire(self) -> None:
        """Removes finished, failed and cancelled requests from the batch."""
        keep, gone = [], []
        for row, request in enumerate(self._active):
            if request.error is not None:
                self._finish(request, FinishReason.CANCELLED, error=request.error)
            elif request.cancelled:
                self._finish(request, FinishReason.CANCELLED)
            elif request.finish is None:
                keep.append(row)
                continue
            else:
                self._finish(request, request.finish)
            gone.append(request)
        if not gone:
            return
        self._active = [self._active[row] for row in keep]
        self._drop(keep, gone)

    def _finish(self, request: Request, reason: FinishReason, error=None) -> None:
        if request.done:
            return
        request.done = True
        with self._cv:
            self._by_key.pop(request.job.key, None)
            if reason is not FinishReason.CANCELLED:
                self._lengths.append(request.generated)
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


def _expired(request: Request, now: float) -> bool:
    """Whether the request's deadline (time.monotonic()) has passed."""
    return request.job.deadline is not None and now >= request.job.deadline


def _late_error(request: Request) -> ServiceError | None:
    """What a request leaving before its first token gets: nothing when cancelled (its
    caller is gone), DEADLINE_EXCEEDED when its deadline passed first."""
    if request.cancelled:
        return None
    return DeadlineExceeded(
        "the deadline passed before the request got its first token; retry later or "
        "with a longer deadline"
    )


def _average(last: float, new: float) -> float:
    """The running average after a new measurement (the first one stands alone)."""
    return new if not last else (1 - _SMOOTHING) * last + _SMOOTHING * new


def expected_waits(
    held: list[tuple[int, int, int]],
    waiting: list[tuple[int, int]],
    slots: int,
    prompt_token_seconds: float,
    step_seconds: float,
    busy_chunk: int | None,
    expected_length: float | None,
) -> list[float]:
    """Seconds until each waiting request's first token, from the work ahead of it.

    held: (prompt tokens left to prefill, max_new_tokens, tokens generated) of each
    request in a batch slot, the joining ones in their order; waiting: (prompt tokens,
    max_new_tokens) of each queued request, in order; step_seconds: what a round that
    steps the batch costs beside its prefill; busy_chunk: the prompt tokens a round
    prefills before a decode step of the running requests (None: all joining prompts
    whole, then a step); expected_length: the tokens an answer is expected to take
    (None: each runs to its max_new_tokens).

    It plays the loop forward: queued requests take free slots in order; prompts are
    prefilled oldest first, at the full prefill rate while nothing runs and otherwise
    sharing each round with a decode step; a request runs once its prompt is in and
    frees its slot after `_tokens_left` more tokens. It leaves out what only lengthens
    the wait: a prompt that must wait for room in the KV cache, a step's cost growing
    with the batch."""
    p, s = prompt_token_seconds, step_seconds
    # The steps after which each running request finishes, counted from now.
    running = sorted(
        _tokens_left(max_new, generated, expected_length)
        for tokens, max_new, generated in held
        if not tokens
    )
    joining = deque(
        [tokens, _tokens_left(max_new, generated, expected_length), None]
        for tokens, max_new, generated in held
        if tokens
    )
    queue = deque(enumerate(waiting))
    waits = [0.0] * len(waiting)
    now = steps = 0.0
    while joining or queue:
        while queue and len(running) + len(joining) < slots:
            index, (tokens, max_new) = queue.popleft()
            joining.append([tokens, _tokens_left(max_new, 0, expected_length), index])
        if not joining:
            finish = heapq.heappop(running)
            now += max(finish - steps, 0.0) * s
            steps = max(steps, finish)
            continue
        if running and busy_chunk is not None:
            round_seconds = busy_chunk * p + s
            token_rate, step_rate = busy_chunk / round_seconds, 1 / round_seconds
        else:
            token_rate, step_rate = 1 / p, 0.0
        head = joining[0]
        to_prefill = head[0] / token_rate
        to_free = max(running[0] - steps, 0.0) / step_rate if step_rate else float("inf")
        elapsed = min(to_prefill, to_free)
        now += elapsed
        steps += elapsed * step_rate
        if to_prefill <= to_free:
            joining.popleft()
            heapq.heappush(running, steps + head[1])
            if head[2] is not None:
                waits[head[2]] = now
        else:
            head[0] -= elapsed * token_rate
            heapq.heappop(running)
    return waits


def _tokens_left(max_new: int, generated: int, expected_length: float | None) -> float:
    """The tokens a request that has generated some is expected to take yet: up to the
    expected length but never beyond max_new_tokens, and at least one while it runs
    past that length; up to max_new_tokens when no length is known."""
    end = max_new if expected_length is None else min(max_new, expected_length)
    return max(end - generated, 1)
