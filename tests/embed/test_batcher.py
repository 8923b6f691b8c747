"""The micro-batcher on its own: sharded forward passes, how batches form, failures.

It runs the ONNX backend (the default) and is held to the vectors of the model on torch.
"""

import asyncio

import numpy as np

from services.embed.model import Embedder, Kind, Limits
from services.embed.torch_backend import TorchBackend

LIMITS = Limits(max_texts_per_request=64, max_chars_per_text=5_000)
# Lengths that differ a lot, so sorting and dealing texts to shards reorders them.
MIXED = [" ".join(f"word{j}" for j in range(1 + (i * 37) % 60)) + f" text {i}." for i in range(23)]


async def started(backend, **options) -> Embedder:
    options = {"max_batch_size": 32, "max_wait_ms": 20, **options}
    embedder = Embedder(backend, name="all-MiniLM-L6-v2", limits=LIMITS, **options)
    await embedder.start()
    return embedder


async def test_shards_give_the_model_vectors_in_input_order(onnx_backend, st_model):
    embedder = await started(onnx_backend, compute_threads=3)
    try:
        result = await embedder.embed(MIXED, Kind.DOCUMENT, normalize=False)
    finally:
        await embedder.close()
    np.testing.assert_allclose(result.vectors, st_model.encode(MIXED), atol=1e-4)
    lengths = st_model.tokenizer(MIXED, return_length=True)["length"]
    assert result.token_counts == [int(n) for n in lengths]


async def test_the_torch_backend_gives_the_same_vectors_through_shards(st_model):
    embedder = await started(TorchBackend(st_model), compute_threads=2)
    try:
        result = await embedder.embed(MIXED, Kind.DOCUMENT, normalize=False)
    finally:
        await embedder.close()
    np.testing.assert_allclose(result.vectors, st_model.encode(MIXED), atol=1e-4)
    lengths = st_model.tokenizer(MIXED, return_length=True)["length"]
    assert result.token_counts == [int(n) for n in lengths]


async def test_one_compute_thread_gives_the_same_vectors(onnx_backend, st_model):
    embedder = await started(onnx_backend, compute_threads=1)
    try:
        result = await embedder.embed(MIXED[:5], Kind.DOCUMENT, normalize=True)
    finally:
        await embedder.close()
    expected = st_model.encode(MIXED[:5], normalize_embeddings=True)
    np.testing.assert_allclose(result.vectors, expected, atol=1e-4)


async def test_callers_queued_together_fill_batches_up_to_the_maximum(onnx_backend, st_model):
    embedder = await started(onnx_backend, compute_threads=2)
    try:
        texts = [f"Caller {i} asks about topic {i % 5}." for i in range(40)]
        results = await asyncio.gather(
            *(embedder.embed([text], Kind.QUERY, normalize=True) for text in texts)
        )
    finally:
        await embedder.close()
    expected = st_model.encode(texts, normalize_embeddings=True)
    for result, vector in zip(results, expected, strict=True):
        np.testing.assert_allclose(result.vectors[0], vector, atol=1e-4)
    # Forty one-text callers queued at once: a full batch of 32, then the other 8.
    assert embedder.stats.batch_sizes == {32: 1, 8: 1}
    assert embedder.stats.batches == 2
    assert embedder.stats.max_batch_size == 32
    assert embedder.stats.texts == 40


async def test_no_batch_given_to_the_model_exceeds_the_maximum(onnx_backend, st_model):
    # Requests of several texts, one larger than a batch, all queued at once.
    sizes = [5, 5, 20, 3, 7]
    requests = [[f"Request {r} text {i}." for i in range(size)] for r, size in enumerate(sizes)]
    embedder = await started(onnx_backend, max_batch_size=8)
    try:
        results = await asyncio.gather(
            *(embedder.embed(texts, Kind.DOCUMENT, normalize=False) for texts in requests)
        )
    finally:
        await embedder.close()
    for texts, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.vectors, st_model.encode(texts), atol=1e-4)
    # The sizes of the batches the model really ran, as recorded when each was handed over.
    run = embedder.stats.batch_sizes
    assert max(run) <= 8
    assert sum(size * count for size, count in run.items()) == sum(sizes)
    assert embedder.stats.max_batch_size == max(run)


class FailsOnText:
    """The real backend, with an injected fault: encode raises for any batch holding `text`."""

    def __init__(self, backend, text: str) -> None:
        self._backend = backend
        self._text = text

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, texts):
        if any(self._text in text for text in texts):
            raise RuntimeError(f"injected failure on {self._text!r}")
        return self._backend.encode(texts)


async def test_injected_encode_failure_on_one_text_fails_only_its_caller(onnx_backend, st_model):
    embedder = await started(FailsOnText(onnx_backend, "poison"))
    texts = [f"Caller {i} asks about topic {i}." for i in range(6)]
    texts[3] = "a poison text"
    try:
        results = await asyncio.gather(
            *(embedder.embed([text], Kind.QUERY, normalize=True) for text in texts),
            return_exceptions=True,
        )
    finally:
        await embedder.close()
    assert isinstance(results[3], RuntimeError)
    assert "poison" in str(results[3])
    for index, (text, result) in enumerate(zip(texts, results, strict=True)):
        if index != 3:
            expected = st_model.encode([text], normalize_embeddings=True)
            np.testing.assert_allclose(result.vectors, expected, atol=1e-4)
    # The six shared one batch, which failed; then each ran on its own.
    assert embedder.stats.batch_sizes == {6: 1, 1: 6}


async def test_a_lone_caller_is_served_without_others(onnx_backend):
    embedder = await started(onnx_backend, max_wait_ms=1000, linger_ms=1)
    try:
        result = await asyncio.wait_for(
            embedder.embed(["alone"], Kind.QUERY, normalize=True), timeout=30
        )
    finally:
        await embedder.close()
    assert result.vectors.shape == (1, 384)
    assert embedder.stats.batches == 1
