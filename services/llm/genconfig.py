"""Generation settings: validation, per-request overrides, and the stored config with revisions."""

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from services.common.errors import InvalidArgument

_LOGGER = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 8
MAX_STOP_SEQUENCE_CHARS = 64
# Used to validate max_new_tokens while no model tells us its context window.
FALLBACK_CONTEXT_LENGTH = 1 << 20


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None
    revision: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


FIELD_NAMES = frozenset(f.name for f in fields(GenerationParams)) - {"revision"}


def violations(params: GenerationParams, context_length: int, prefix: str = "") -> list[tuple]:
    """Every out-of-range value of params as (field, description) pairs."""
    found = []
    if not 0.0 <= params.temperature <= 2.0:
        found.append(("temperature", "must be between 0 and 2 (0 means greedy)"))
    if not 0.0 < params.top_p <= 1.0:
        found.append(("top_p", "must be greater than 0 and at most 1"))
    if params.top_k < 0:
        found.append(("top_k", "must be 0 (disabled) or more"))
    if not 1 <= params.max_new_tokens <= context_length:
        found.append(
            ("max_new_tokens", f"must be between 1 and the context length ({context_length})")
        )
    if not 1.0 <= params.repetition_penalty <= 2.0:
        found.append(("repetition_penalty", "must be between 1.0 (no penalty) and 2.0"))
    if len(params.stop_sequences) > MAX_STOP_SEQUENCES:
        found.append(("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences"))
    for i, stop in enumerate(params.stop_sequences):
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            found.append(
                (f"stop_sequences[{i}]", f"must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters")
            )
    if params.seed is not None and not 0 <= params.seed < 2**63:
        found.append(("seed", "must be between 0 and 2^63 - 1"))
    return [(prefix + name, text) for name, text in found]


def apply_overrides(
    base: GenerationParams, overrides: dict, context_length: int, prefix: str = "overrides."
) -> GenerationParams:
    """The params for one request: base with overrides; the stored config is not touched."""
    params = replace(base, **overrides)
    found = violations(params, context_length, prefix)
    if found:
        raise InvalidArgument(
            "invalid settings for this request: " + "; ".join(f"{f} {d}" for f, d in found),
            field_violations=found,
        )
    return params


@dataclass
class GenerationConfigStore:
    """The stored config; every applied update gets the next revision and is saved to disk."""

    path: Path | None = None
    _params: GenerationParams = field(default_factory=GenerationParams)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                stored["stop_sequences"] = tuple(stored.get("stop_sequences", ()))
                self._params = GenerationParams(**stored)
            except (ValueError, TypeError) as exc:
                _LOGGER.warning("ignoring unreadable %s: %s", self.path, exc)

    def get(self) -> GenerationParams:
        return self._params

    def update(self, changes: dict, context_length: int) -> GenerationParams:
        """Applies changes (field -> value) all or nothing; returns the applied config."""
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise InvalidArgument(
                f"unknown field(s) in update_mask: {', '.join(unknown)}",
                field_violations=[(f"update_mask.{name}", "no such field") for name in unknown],
            )
        with self._lock:
            candidate = replace(self._params, **changes)
            found = violations(candidate, context_length, "config.")
            if found:
                raise InvalidArgument(
                    "invalid generation config: " + "; ".join(f"{f} {d}" for f, d in found),
                    field_violations=found,
                )
            candidate = replace(candidate, revision=self._params.revision + 1)
            self._save(candidate)
            self._params = candidate
            _LOGGER.info("generation config revision %d: %s", candidate.revision, changes)
            return candidate

    def _save(self, params: GenerationParams) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(asdict(params), indent=2))
        os.replace(staging, self.path)
