"""Backend that relays generation to an OpenAI-compatible server (vLLM, Ollama, llama.cpp, TGI)."""

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.llm.engine import Delta, EngineInfo, FinishReason, Job, Message, Result

_LOGGER = logging.getLogger(__name__)


class RemoteLoadError(Exception):
    """The server could not be used; the message is the reason shown in the model status."""


@dataclass(eq=False)
class _Running:
    events: asyncio.Queue
    task: asyncio.Task | None = None


class OpenAIEngine:
    """Streams /v1/completions (Generate) and /v1/chat/completions (Chat) over httpx.

    `base_url` must come from the operator's allow-list (RAGMESH_LLM_REMOTE_BASE_URLS):
    the API key goes to it, and redirects are never followed, so it goes nowhere else.
    """

    # A failing server fails its requests; this engine has no state to restart.
    failure = ""
    on_health_change = None

    def __init__(self, client: httpx.AsyncClient, model: str, info: EngineInfo, limit: int):
        self._client = client
        self._model = model
        self.info = info
        self._limit = limit
        self._running: dict[tuple[str, str, str], _Running] = {}

    @classmethod
    async def connect(
        cls, base_url: str, model: str, wait_seconds: float, limit: int, api_key: str = ""
    ) -> "OpenAIEngine":
        """Checks that the server answers /models and serves `model` within wait_seconds."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(wait_seconds, read=None),
            follow_redirects=False,
        )
        try:
            response = await client.get("models", timeout=wait_seconds)
            response.raise_for_status()
            served = [str(m.get("id", "")) for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            await client.aclose()
            raise RemoteLoadError(
                f"OpenAI-compatible server at {base_url} unusable: {_describe(exc)}"
            ) from exc
        if served and model not in served:
            await client.aclose()
            raise RemoteLoadError(
                f"the server at {base_url} does not serve {model}; "
                f"it serves {', '.join(served[:10])}"
            )
        info = EngineInfo(name=model, device="remote", has_tokenizer=False)
        return cls(client, model, info, limit)

    def memory_bytes(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        raise FailedPrecondition(
            "token counts are not available for a model behind an OpenAI-compatible server",
            reason="NO_TOKENIZER",
        )

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self.encode("")

    async def stream(self, job: Job):
        if job.key in self._running:
            raise InvalidArgument(
                f"request {job.request_id} is already running", field="request_id"
            )
        if len(self._running) >= self._limit:
            raise ResourceExhausted("too many requests in flight; retry later", reason="QUEUE_FULL")
        running = _Running(asyncio.Queue())
        self._running[job.key] = running
        running.task = asyncio.create_task(self._relay(job, running.events))
        try:
            while True:
                event = await running.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Result):
                    return
        finally:
            self._running.pop(job.key, None)
            running.task.cancel()

    def cancel(self, key: tuple[str, str, str]) -> bool:
        running = self._running.get(key)
        if running is None or running.task is None or running.task.done():
            return False
        running.task.cancel()
        return True

    async def close(self, drain: bool = False) -> None:
        if drain:
            tasks = [r.task for r in self._running.values() if r.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
        for running in list(self._running.values()):
            running.task.cancel()
        await self._client.aclose()

    async def _relay(self, job: Job, events: asyncio.Queue) -> None:
        params = job.params
        body = {
            "model": self._model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        # Not in the OpenAI API, but vLLM and llama.cpp honour them and others ignore them.
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop_sequences:
            body["stop"] = list(params.stop_sequences)
        if params.seed is not None:
            body["seed"] = params.seed
        if job.messages is not None:
            path = "chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in job.messages]
        else:
            path = "completions"
            body["prompt"] = job.prompt
        started = time.perf_counter()
        first = 0.0
        pieces: list[str] = []
        usage: dict = {}
        finish = None
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    # The reply is the operator's to read, never the caller's.
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    _LOGGER.warning(
                        "relay of %s: HTTP %d: %s", job.request_id, response.status_code, detail
                    )
                    raise Unavailable(
                        f"the OpenAI-compatible server answered HTTP {response.status_code}",
                        reason="BACKEND_ERROR",
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if text:
                            first = first or time.perf_counter()
                            pieces.append(text)
                            events.put_nowait(Delta(text))
                        finish = choice.get("finish_reason") or finish
        except asyncio.CancelledError:
            finish = "cancelled"
        except (httpx.HTTPError, ValueError) as exc:
            _LOGGER.warning("relay of %s failed: %s", job.request_id, exc)
            events.put_nowait(
                Unavailable(
                    f"the OpenAI-compatible server failed: {_describe(exc)}",
                    reason="BACKEND_ERROR",
                )
            )
            return
        except Unavailable as exc:
            events.put_nowait(exc)
            return
        now = time.perf_counter()
        events.put_nowait(
            Result(
                finish_reason=_finish_reason(finish, bool(params.stop_sequences)),
                text="".join(pieces),
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", len(pieces)),
                queue_seconds=0.0,
                time_to_first_token_seconds=(first or now) - started,
                total_seconds=now - started,
                model=self._model,
            )
        )


def _describe(exc: Exception) -> str:
    """An error without the server's words: they may carry whatever it chose to reply."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def _finish_reason(reason: str | None, had_stops: bool) -> FinishReason:
    if reason == "cancelled":
        return FinishReason.CANCELLED
    if reason == "length":
        return FinishReason.LENGTH
    # OpenAI says "stop" for both an end-of-sequence token and a stop sequence.
    return FinishReason.STOP if had_stops else FinishReason.EOS
