"""Splits parsed text into chunks sized in the embedding model's tokens, at natural breaks."""

import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.ingest.parsers import ParsedDocument

Tokenizer = Callable[[list[str]], Awaitable[list[list[tuple[int, int]]]]]

# How good a place is to end a chunk, weakest first.
_TOKEN, _SENTENCE, _PARAGRAPH, _HEADING = range(4)
_SENTENCE_END = frozenset(".!?;:")


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    start: int
    end: int
    page: int
    heading: str
    token_count: int


@dataclass(frozen=True)
class TokenizerLimits:
    max_texts: int
    max_chars: int


async def token_spans(
    text: str, blocks: list[tuple[int, int]], tokenize: Tokenizer, limits: TokenizerLimits
) -> list[tuple[int, int]]:
    """Every token of `text` as absolute character spans, asking the tokenizer in batches."""
    pieces = [
        piece for start, end in blocks for piece in _pieces(text, start, end, limits.max_chars)
    ]
    spans: list[tuple[int, int]] = []
    # Keep each call's message well under gRPC limits however many small blocks there are.
    budget = min(limits.max_chars * 4, 1_000_000)
    batch: list[tuple[int, int]] = []
    batch_chars = 0
    for piece in [*pieces, None]:
        if (
            piece is None
            or len(batch) >= limits.max_texts
            or batch_chars + piece[1] - piece[0] > budget
        ):
            if batch:
                results = await tokenize([text[start:end] for start, end in batch])
                for (start, _), offsets in zip(batch, results, strict=True):
                    spans.extend((start + a, start + b) for a, b in offsets if b > a)
            batch, batch_chars = [], 0
        if piece is not None:
            batch.append(piece)
            batch_chars += piece[1] - piece[0]
    return spans


def _pieces(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cuts a block the tokenizer would refuse into pieces, at whitespace where possible."""
    pieces = []
    while end - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = cut if cut > start else start + max_chars
        pieces.append((start, cut))
        start = cut
    if text[start:end].strip():
        pieces.append((start, end))
    return pieces


def plan_chunks(
    document: ParsedDocument, tokens: list[tuple[int, int]], *, size: int, overlap: int
) -> list[ChunkSpec]:
    """Greedy chunks of at most `size` tokens, ending at the strongest break in their second
    half, the next one starting `overlap` tokens back (at a sentence start if one is there).
    A chunk never overlaps into a new section: after a heading break there is no overlap."""
    if not tokens:
        return []
    text = document.text
    starts = [start for start, _ in tokens]
    strength: dict[int, int] = {}
    for span in document.spans:
        first = bisect.bisect_left(starts, span.start)
        strength[first] = _HEADING if span.level else max(strength.get(first, 0), _PARAGRAPH)

    def strength_at(position: int) -> int:
        found = strength.get(position)
        if found is not None:
            return found
        previous_end = tokens[position - 1][1]
        if text[previous_end - 1] in _SENTENCE_END and tokens[position][0] > previous_end:
            return _SENTENCE
        return _TOKEN

    span_starts = [span.start for span in document.spans]
    chunks: list[ChunkSpec] = []
    count = len(tokens)
    first = 0
    while first < count:
        limit = min(first + size, count)
        cut = limit
        if limit < count:
            best = -1
            for position in range(limit, first + max(1, size // 2), -1):
                found = strength_at(position)
                if found > best:
                    best, cut = found, position
                    if found == _HEADING:
                        break
        start_char = tokens[first][0]
        span = document.spans[max(bisect.bisect_right(span_starts, start_char) - 1, 0)]
        chunks.append(
            ChunkSpec(
                index=len(chunks),
                start=start_char,
                end=tokens[cut - 1][1],
                page=span.page,
                heading=span.heading,
                token_count=cut - first,
            )
        )
        if cut >= count:
            break
        if overlap == 0 or strength_at(cut) == _HEADING:
            first = cut
            continue
        following = max(cut - overlap, first + 1)
        for position in range(following, cut):
            if strength_at(position) >= _SENTENCE:
                following = position
                break
        first = following
    return chunks
