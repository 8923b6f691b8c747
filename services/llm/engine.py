"""What every generation backend offers the model manager: jobs in, text deltas and a result out."""

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.llm.genconfig import GenerationParams


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass
class Job:
    """One Generate or Chat request, after validation and prompt fitting."""

    request_id: str
    params: GenerationParams
    # Exactly one of: token ids (local backend), a raw prompt or messages (remote backend).
    prompt_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    # (tenant, subject) of the caller: request ids are scoped to it, and Cancel reaches
    # only the caller's own requests.
    owner: tuple[str, str] = ("", "")
    # time.monotonic() by which the caller needs the answer; None without a deadline.
    deadline: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (*self.owner, self.request_id)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Result:
    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    dropped_messages: int = 0
    model: str = ""

    @property
    def tokens_per_second(self) -> float:
        decoding = self.total_seconds - self.queue_seconds
        return self.completion_tokens / decoding if decoding > 0 else 0.0


@dataclass
class EngineInfo:
    name: str
    device: str = ""
    context_length: int = 0
    parameter_count: int = 0
    # Local backends own a tokenizer; a remote one does not.
    has_tokenizer: bool = True
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    info: EngineInfo
    # Empty while the engine can serve; why it cannot while it restarts after a failure.
    failure: str
    # Called, from any thread, whenever `failure` changes.
    on_health_change: Callable[[], None] | None

    def memory_bytes(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[Message]) -> list[int]: ...

    def stream(self, job: Job) -> AsyncIterator[Delta | Result]: ...

    def cancel(self, key: tuple[str, str, str]) -> bool: ...

    async def close(self, drain: bool = False) -> None: ...


def error_text(exc: BaseException) -> str:
    """An exception as a status message: its type and first line, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]
