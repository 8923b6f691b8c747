"""Splits parsed text into chunks sized in the embedding model's tokens, at natural breaks."""

import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.ingest.parsers import ParsedDocument

Tokenizer = Callable[[list[str]], Awaitable[list[list[tuple[int, int]]]]]

# How good a place is to end a chunk, weakest first.
_TOKEN, _SENTENCE, _PARAGRAPH, _HEADING = range(4)
_SENTENCE_END = frozenset(".!?;:")
# A token longer than this is an unknown word to the tokenizer (a hex or base64 blob, a
# minified identifier) and counts as one token per this many characters, so chunks of
# it are about the size of chunks of prose instead of one unknown word of 100,000.
_LONGEST_TOKEN = 16


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
    """Every token of `text` as absolute character spans, asking the tokenizer in batches;
    a token longer than _LONGEST_TOKEN characters comes back cut into pieces of that size."""
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
                    for a, b in offsets:
                        spans.extend(
                            (start + cut, start + min(cut + _LONGEST_TOKEN, b))
                            for cut in range(a, b, _LONGEST_TOKEN)
                        )
            batch, batch_chars = [], 0
        if piece is not None:
            batch.append(piece)
            batch_chars += piece[1] - piece[0]
    return spans


def _pieces(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cuts a block the tokenizer would refuse into pieces, at whitespace where possible;
    a piece of whitespace alone (inside a long run of spaces) is left out."""
    pieces = []
    while end - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = cut if cut > start else start + max_chars
        if text[start:cut].strip():
            pieces.append((start, cut))
        start = cut
    if text[start:end].strip():
        pieces.append((start, end))
    return pieces


def plan_chunks(
    document: ParsedDocument,
    tokens: list[tuple[int, int]],
    *,
    size: int,
    overlap: int,
    max_chars: int,
) -> list[ChunkSpec]:
    """Greedy chunks of at most `size` tokens and `max_chars` characters (what the embed
    service takes), ending at the strongest break in their second half, the next one
    starting `overlap` tokens back (at a sentence start if one is there). A chunk never
    overlaps into a new section: after a heading break there is no overlap. Every token
    must be at most `max_chars` long, as token_spans makes them."""
    if not tokens:
        return []
    text = document.text
    starts = [start for start, _ in tokens]
    ends = [end for _, end in tokens]
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
    first = previous_cut = 0
    while first < count:
        # The most tokens from `first` that fit both limits; always at least one.
        fitting = bisect.bisect_right(ends, starts[first] + max_chars)
        limit = max(min(first + size, count, fitting), first + 1)
        cut = limit
        if limit < count:
            best = -1
            # In the second half, and past the previous chunk's end: every chunk moves on.
            floor = max(first + max(1, (limit - first) // 2), previous_cut)
            for position in range(limit, floor, -1):
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
        previous_cut = cut
        if overlap == 0 or strength_at(cut) == _HEADING:
            first = cut
            continue
        # The overlap leaves room for the next token, so the next chunk moves on.
        room = bisect.bisect_left(starts, ends[cut] - max_chars)
        following = max(cut - overlap, first + 1, room)
        for position in range(following, cut):
            if strength_at(position) >= _SENTENCE:
                following = position
                break
        first = following
    return chunks
