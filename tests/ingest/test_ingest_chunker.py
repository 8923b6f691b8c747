"""The parser and chunker as plain domain code: the real model tokenizer, no server."""

import itertools

import pytest
from transformers import AutoTokenizer

from services.embed.model import resolve_model
from services.ingest.chunker import TokenizerLimits, plan_chunks, token_spans
from services.ingest.parsers import Block, assemble, decode_text, sniff


@pytest.fixture(scope="module")
def tokenize():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))

    async def spans(texts):
        encoded = tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        return [list(map(tuple, offsets)) for offsets in encoded["offset_mapping"]]

    return spans


async def _plan(blocks, tokenize, size=40, overlap=8, max_chars=500):
    document = assemble(blocks, 0)
    tokens = await token_spans(
        document.text,
        [(s.start, s.end) for s in document.spans],
        tokenize,
        TokenizerLimits(max_texts=4, max_chars=max_chars),
    )
    chunks = plan_chunks(document, tokens, size=size, overlap=overlap, max_chars=max_chars)
    return document, tokens, chunks


async def test_chunks_respect_size_cover_the_text_and_overlap(tokenize):
    sentences = " ".join(f"This is sentence {n} of a long paragraph." for n in range(60))
    document, _, chunks = await _plan([Block(sentences)], tokenize, overlap=12, max_chars=300)
    assert len(chunks) > 3
    assert all(chunk.token_count <= 40 for chunk in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(document.text)
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.end  # overlap
        assert after.start > before.start
        # With an overlap longer than a sentence, it starts at a sentence, not mid-way.
        assert document.text[after.start : after.start + 4] == "This"


async def test_a_heading_starts_a_chunk_without_overlap(tokenize):
    blocks = [
        Block("Intro", level=1),
        Block("word " * 25),
        Block("Details", level=2),
        Block("more words here. " * 6),
    ]
    document, _, chunks = await _plan(blocks, tokenize)
    details = document.text.index("Details")
    assert any(chunk.start == details for chunk in chunks)
    assert all(not (chunk.start < details < chunk.end) for chunk in chunks)
    assert chunks[-1].heading == "Intro > Details"


def test_sniffing_reads_bytes_not_names(tmp_path):
    path = tmp_path / "x"
    assert sniff(b"%PDF-1.4 ...", path, "notes.txt", "") == "application/pdf"
    assert sniff(b"<!doctype html><p>x", path, "page.md", "") == "text/html"
    assert sniff(b"# Title\n\ntext", path, "readme.md", "") == "text/markdown"
    assert sniff(b"# Title\n\ntext", path, "readme", "text/markdown") == "text/markdown"
    assert sniff(b"plain words", path, "a.bin", "") == "text/plain"
    assert sniff(b"\x7fELF\x02\x01\x01\x00\x00", path, "a.txt", "") is None
    assert decode_text("naïve".encode("utf-16")) == "naïve"


async def test_chunks_fit_the_character_limit_whatever_the_text(tokenize):
    # An unknown 700-character word, and two words 900 spaces apart, against 500 characters.
    blocks = [Block("word " * 30 + "x" * 700 + " tail words"), Block("a" + " " * 900 + "b")]
    document, _, chunks = await _plan(blocks, tokenize, size=40, overlap=8, max_chars=500)
    text = document.text
    covered = bytearray(len(text))
    for chunk in chunks:
        assert chunk.end - chunk.start <= 500
        assert chunk.token_count <= 40
        covered[chunk.start : chunk.end] = b"\x01" * (chunk.end - chunk.start)
    assert all(covered[n] or text[n].isspace() for n in range(len(text)))
    # Each chunk moves on: none ends where the one before it ended.
    assert all(before.end < after.end for before, after in itertools.pairwise(chunks))
