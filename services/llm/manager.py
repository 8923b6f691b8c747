"""The model lifecycle: background load, swap without downtime, unload, status watch, and the
entry points for generation that route requests to the serving model."""

import asyncio
import enum
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metrics import QueueFigures
from services.llm import catalogue, hub, loading
from services.llm.batching import BatchingEngine
from services.llm.engine import Delta, Engine, Job, Message, Result, error_text
from services.llm.genconfig import (
    FALLBACK_CONTEXT_LENGTH,
    GenerationConfigStore,
    GenerationParams,
    apply_overrides,
)
from services.llm.loading import LoadOptions
from services.llm.openai_backend import OpenAIEngine, RemoteLoadError
from services.llm.settings import LlmSettings

_LOGGER = logging.getLogger(__name__)

CONTEXT_INSTRUCTIONS = (
    "Answer using the passages below when they are relevant, and cite each passage you "
    "use by its id in square brackets, for example [doc-1#0]."
)


class State(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    # The serving engine failed and restarts; it refuses generation meanwhile.
    RESTARTING = "restarting"


@dataclass(frozen=True)
class Status:
    state: State
    model: str = ""
    options: LoadOptions | None = None
    error: str = ""
    progress: float = 0.0
    load_seconds: float = 0.0
    parameter_count: int = 0
    memory_bytes: int = 0
    context_length: int = 0
    generation_config: GenerationParams = field(default_factory=GenerationParams)
    serving_model: str = ""
    device: str = ""
    update_time: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    source: str = ""


class ModelManager:
    """Owns the serving engine; loads run in the background and swap in atomically."""

    def __init__(
        self,
        settings: LlmSettings,
        config: GenerationConfigStore,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._config = config
        self._on_serving = on_serving
        self._engine: Engine | None = None
        # Engines replaced by a swap that finish their running requests before closing.
        self._retiring: set[Engine] = set()
        self._status = Status(State.NOT_LOADED)
        self._load_task: asyncio.Task | None = None
        self._watchers: set[asyncio.Queue] = set()
        self._background: set[asyncio.Task] = set()
        # What health last said, and a lock so that reports land in order.
        self._reported_serving = False
        self._serving_lock = asyncio.Lock()

    # -- status --------------------------------------------------------------------------

    def status(self) -> Status:
        engine = self._engine
        status = replace(self._status, generation_config=self._config.get())
        if engine is None:
            return status
        info = engine.info
        status = replace(status, serving_model=info.name, memory_bytes=engine.memory_bytes())
        if status.state is State.READY and engine.failure:
            status = replace(status, state=State.RESTARTING, error=engine.failure)
        if status.state is State.READY:
            status = replace(
                status,
                parameter_count=info.parameter_count,
                context_length=info.context_length,
                device=info.device,
            )
        return status

    def queue_figures(self) -> QueueFigures:
        """The serving engine's queue and decode batches since it loaded; zeros without a
        model or for a remote one (its server batches)."""
        engine = self._engine
        if isinstance(engine, BatchingEngine):
            return engine.queue_figures()
        return QueueFigures(depth=0, batches=0, batched_items=0, max_batch_size=0)

    async def watch(self) -> AsyncIterator[Status]:
        """The current status, then one per transition, until the caller stops."""
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield self.status()
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def _transition(self, state: State, **changes) -> None:
        self._status = replace(self._status, state=state, update_time=datetime.now(UTC), **changes)
        snapshot = self.status()
        _LOGGER.info("model %s: %s %s", snapshot.model, snapshot.state.value, snapshot.error)
        for queue in self._watchers:
            queue.put_nowait(snapshot)

    def _engine_health_changed(self, engine: Engine) -> None:
        if engine is not self._engine:
            return
        self._transition(self._status.state)
        self._spawn(self._publish_serving())

    async def _publish_serving(self) -> None:
        """Reports health as it is now: SERVING while a model serves and its engine works."""
        async with self._serving_lock:
            engine = self._engine
            serving = engine is not None and not engine.failure
            if serving != self._reported_serving and self._on_serving is not None:
                await self._on_serving(serving)
            self._reported_serving = serving

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def context_length(self) -> int:
        engine = self._engine
        return (
            engine.info.context_length
            if engine and engine.info.context_length
            else (FALLBACK_CONTEXT_LENGTH)
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def load(self, options: LoadOptions) -> Status:
        """Validates, then loads in the background; returns the LOADING status at once."""
        if self._load_task is not None and not self._load_task.done():
            raise FailedPrecondition(
                f"a load of {self._status.model} is already in flight; wait for it to finish",
                reason="LOAD_IN_FLIGHT",
            )
        if self._status.state is State.UNLOADING:
            raise FailedPrecondition("the model is unloading; retry when it is done")
        resolved = None if options.backend == "openai" else self._resolve(options)
        options, device = loading.check_options(options, self._settings, resolved)
        self._transition(
            State.LOADING,
            model=options.model,
            options=options,
            error="",
            progress=0.0,
            load_seconds=0.0,
        )
        self._load_task = asyncio.create_task(self._load(options, device, resolved))
        return self.status()

    def _resolve(self, options: LoadOptions) -> catalogue.ResolvedModel:
        settings = self._settings
        return catalogue.resolve(
            options.model,
            options.gguf_file,
            settings.resolved_models_dir,
            settings.resolved_model_roots,
        )

    async def _load(self, options, device, resolved) -> None:
        started = time.perf_counter()
        settings = self._settings
        try:
            if options.backend == "openai":
                engine = await OpenAIEngine.connect(
                    options.base_url,
                    options.model,
                    settings.remote_timeout_seconds,
                    settings.max_batch_size + settings.max_queue,
                    settings.remote_api_key,
                )
            else:
                hub_path = None
                if resolved.hub_id:
                    hub_path = await hub.download(
                        hub.Fetch(
                            repo=resolved.hub_id,
                            revision=options.revision,
                            gguf_file=resolved.gguf_file,
                            remote_code=options.trust_remote_code,
                            max_bytes=settings.hub_max_download_bytes,
                            cache_dir=str(catalogue.hf_cache_dir()),
                            request_timeout=settings.hub_timeout_seconds,
                        ),
                        settings.hub_download_timeout_seconds,
                    )
                    self._transition(State.LOADING, progress=0.5)
                limits = {
                    "max_batch": settings.max_batch_size,
                    "max_queue": settings.max_queue,
                    "max_context": settings.max_context_tokens,
                    "hub_cache_path": hub_path,
                }
                if options.backend == "llama_cpp":
                    load = functools.partial(loading.load_llama_cpp, threads=settings.threads)
                else:
                    load = loading.load_transformers
                engine = await asyncio.to_thread(load, resolved, options, device, **limits)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOGGER.exception("loading %s failed", options.model)
            self._fail(_load_error_text(exc))
            return
        loop = asyncio.get_running_loop()
        engine.on_health_change = functools.partial(
            loop.call_soon_threadsafe, self._engine_health_changed, engine
        )
        old, self._engine = self._engine, engine
        if old is not None:
            self._retiring.add(old)
            self._spawn(self._retire(old))
        self._transition(State.READY, progress=1.0, load_seconds=time.perf_counter() - started)
        await self._publish_serving()

    def _fail(self, reason: str) -> None:
        self._transition(State.FAILED, error=reason, progress=0.0)

    async def _retire(self, engine: Engine) -> None:
        try:
            await engine.close(drain=True)
        finally:
            self._retiring.discard(engine)

    async def unload(self) -> Status:
        if self._load_task is not None and not self._load_task.done():
            raise FailedPrecondition("a load is in flight; unload when it has finished")
        engine = self._engine
        if engine is None:
            raise FailedPrecondition("no model is loaded", reason="NO_MODEL_LOADED")
        self._engine = None
        await self._publish_serving()
        self._transition(State.UNLOADING)
        await engine.close()
        self._transition(State.NOT_LOADED, model="", options=None, error="", progress=0.0)
        return self.status()

    async def close(self) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
        for engine in [self._engine, *self._retiring]:
            if engine is not None:
                await engine.close()
        self._engine = None

    # -- generation ----------------------------------------------------------------------

    def _serving(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise FailedPrecondition(
                f"no model is ready (state {self._status.state.name})",
                reason="MODEL_NOT_READY",
                metadata={"state": self._status.state.name},
            )
        return engine

    def count_prompt(self, prompt: str) -> tuple[int, int]:
        engine = self._serving()
        return len(engine.encode(prompt)), engine.info.context_length

    def count_chat(self, messages: list[Message]) -> tuple[int, int]:
        engine = self._serving()
        _check_messages(messages)
        return len(engine.encode_chat(messages)), engine.info.context_length

    def _params(self, engine: Engine, overrides: dict) -> GenerationParams:
        context = engine.info.context_length or FALLBACK_CONTEXT_LENGTH
        return apply_overrides(self._config.get(), overrides, context)

    async def generate(
        self,
        prompt: str,
        overrides: dict,
        request_id: str,
        owner: tuple[str, str],
        deadline: float | None = None,
    ) -> tuple[Job, AsyncIterator[Delta | Result]]:
        engine = self._serving()
        if not prompt:
            raise InvalidArgument("prompt is required", field="prompt")
        params = self._params(engine, overrides)
        job = Job(
            request_id or uuid.uuid4().hex, params, prompt=prompt, owner=owner, deadline=deadline
        )
        if engine.info.has_tokenizer:
            job.prompt_ids = engine.encode(prompt)
            total = len(job.prompt_ids) + params.max_new_tokens
            if total > engine.info.context_length:
                raise InvalidArgument(
                    f"the prompt has {len(job.prompt_ids)} tokens; with max_new_tokens "
                    f"{params.max_new_tokens} that exceeds the context window of "
                    f"{engine.info.context_length}",
                    field="prompt",
                    reason="CONTEXT_WINDOW_EXCEEDED",
                )
        return job, engine.stream(job)

    async def chat(
        self,
        messages: list[Message],
        system_prompt: str,
        passages: list[Passage],
        overrides: dict,
        request_id: str,
        owner: tuple[str, str],
        deadline: float | None = None,
    ) -> tuple[Job, int, AsyncIterator[Delta | Result]]:
        engine = self._serving()
        _check_messages(messages)
        params = self._params(engine, overrides)
        system = _system_message(system_prompt, passages)
        conversation = ([system] if system else []) + list(messages)
        job = Job(request_id or uuid.uuid4().hex, params, owner=owner, deadline=deadline)
        dropped = 0
        if engine.info.has_tokenizer:
            budget = engine.info.context_length - params.max_new_tokens
            conversation, dropped, job.prompt_ids = _fit(engine, conversation, budget)
        job.messages = conversation
        return job, dropped, engine.stream(job)

    def cancel(self, request_id: str, owner: tuple[str, str]) -> None:
        """Cancels the owner's request; another caller's answers as not found."""
        key = (*owner, request_id)
        for engine in [self._engine, *self._retiring]:
            if engine is not None and engine.cancel(key):
                return
        raise NotFound(f"no running request {request_id}", reason="REQUEST_NOT_FOUND")


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    for i, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant"):
            raise InvalidArgument(
                "role must be system, user or assistant", field=f"messages[{i}].role"
            )
    if not any(m.role == "user" for m in messages):
        raise InvalidArgument("the conversation needs a user message", field="messages")


def _system_message(system_prompt: str, passages: list[Passage]) -> Message | None:
    parts = [system_prompt.strip()] if system_prompt.strip() else []
    if passages:
        parts.append(CONTEXT_INSTRUCTIONS)
        for passage in passages:
            source = f" ({passage.source})" if passage.source else ""
            parts.append(f"[{passage.id}]{source}\n{passage.text}")
    return Message("system", "\n\n".join(parts)) if parts else None


def _fit(engine: Engine, conversation: list[Message], budget: int):
    """Drops whole messages from the oldest until the prompt fits; never system messages or
    the last user message."""
    last_user = max(i for i, m in enumerate(conversation) if m.role == "user")
    keep = list(range(len(conversation)))
    droppable = [i for i in keep if conversation[i].role != "system" and i != last_user]
    dropped = 0
    while True:
        kept = [conversation[i] for i in keep]
        ids = engine.encode_chat(kept)
        if len(ids) <= budget:
            return kept, dropped, ids
        if not droppable:
            raise InvalidArgument(
                f"the conversation needs {len(ids)} tokens even after dropping {dropped} "
                f"older message(s); the context window leaves {max(budget, 0)} after "
                "max_new_tokens. Shorten the system prompt, passages or last message",
                field="messages",
                reason="CONTEXT_WINDOW_EXCEEDED",
            )
        keep.remove(droppable.pop(0))
        dropped += 1


def _load_error_text(exc: Exception) -> str:
    if isinstance(exc, RemoteLoadError | hub.HubError):
        return str(exc)
    return error_text(exc)
