"""The in-process keyword index over chunks: BM25 postings and filter columns.

Keyword search lives here on every backend, so a query ranks the same on SQLite and
PostgreSQL: the analyzer and the BM25 formula are ours, not the database's. Vectors live
in the vector store (services/ingest/index.py), not here.
"""

import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.text import Analyzer


@dataclass(frozen=True)
class IndexedChunk:
    chunk_id: str
    document_id: str
    tenant: str
    mime_type: str
    tags: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Filter:
    tenant: str
    document_ids: Sequence[str] = ()
    tags: Sequence[str] = ()
    mime_types: Sequence[str] = ()


class _Codes:
    """Interns strings as small integers so filters are numpy comparisons."""

    def __init__(self) -> None:
        self.by_value: dict[str, int] = {}

    def code(self, value: str) -> int:
        return self.by_value.setdefault(value, len(self.by_value))

    def find(self, values: Iterable[str]) -> list[int]:
        return [self.by_value[v] for v in values if v in self.by_value]


class SearchIndex:
    """Chunks in slots; each slot has filter columns, a term count and postings."""

    def __init__(self, analyzer: Analyzer, k1: float = 1.2, b: float = 0.75) -> None:
        self.analyzer = analyzer
        self.k1, self.b = k1, b
        self._lock = threading.RLock()
        self._size = 0
        self._capacity = 0
        self._alive = np.zeros(0, dtype=bool)
        self._tenant = np.zeros(0, dtype=np.int32)
        self._document = np.zeros(0, dtype=np.int32)
        self._mime = np.zeros(0, dtype=np.int32)
        self._length = np.zeros(0, dtype=np.float32)
        self._chunk_ids: list[str] = []
        self._slot_of: dict[str, int] = {}
        self._postings: dict[str, tuple[array, array]] = {}
        self._tenants, self._documents, self._mimes = _Codes(), _Codes(), _Codes()
        self._document_slots: dict[int, list[int]] = {}
        self._document_tags: dict[int, frozenset[str]] = {}

    def __len__(self) -> int:
        return int(self._alive[: self._size].sum())

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, self._capacity * 2, 1024)

        def grown(column: np.ndarray) -> np.ndarray:
            bigger = np.zeros((capacity, *column.shape[1:]), dtype=column.dtype)
            bigger[: self._size] = column[: self._size]
            return bigger

        self._alive, self._tenant, self._document = (
            grown(self._alive),
            grown(self._tenant),
            grown(self._document),
        )
        self._mime, self._length = grown(self._mime), grown(self._length)
        self._capacity = capacity

    def add(self, chunks: Sequence[IndexedChunk]) -> None:
        """Adds chunks; a chunk id already present is replaced."""
        analyzed = [self.analyzer.terms(c.text) for c in chunks]
        with self._lock:
            for chunk, terms in zip(chunks, analyzed, strict=True):
                old = self._slot_of.get(chunk.chunk_id)
                if old is not None:
                    self._alive[old] = False
                self._add_one(chunk, terms)

    def _add_one(self, chunk: IndexedChunk, terms: list[str]) -> None:
        self._grow(self._size + 1)
        slot = self._size
        self._size += 1
        document = self._documents.code(chunk.document_id)
        self._alive[slot] = True
        self._tenant[slot] = self._tenants.code(chunk.tenant)
        self._document[slot] = document
        self._mime[slot] = self._mimes.code(chunk.mime_type)
        self._length[slot] = len(terms)
        self._chunk_ids.append(chunk.chunk_id)
        self._slot_of[chunk.chunk_id] = slot
        self._document_slots.setdefault(document, []).append(slot)
        self._document_tags[document] = frozenset(chunk.tags)
        counts: dict[str, int] = {}
        for term in terms:
            counts[term] = counts.get(term, 0) + 1
        for term, count in counts.items():
            slots, frequencies = self._postings.get(term) or self._postings.setdefault(
                term, (array("i"), array("f"))
            )
            slots.append(slot)
            frequencies.append(count)

    def remove_document(self, document_id: str) -> int:
        """Drops a document's chunks from every search; returns how many there were."""
        with self._lock:
            code = self._documents.by_value.get(document_id)
            if code is None:
                return 0
            slots = self._document_slots.pop(code, [])
            self._alive[slots] = False
            for slot in slots:
                self._slot_of.pop(self._chunk_ids[slot], None)
            self._document_tags.pop(code, None)
            return len(slots)

    def has_document(self, document_id: str) -> bool:
        code = self._documents.by_value.get(document_id)
        return code is not None and code in self._document_slots

    def document_ids(self) -> set[str]:
        with self._lock:
            names = {code: name for name, code in self._documents.by_value.items()}
            return {names[code] for code in self._document_slots}

    def _mask(self, where: Filter) -> np.ndarray | None:
        """Slots the filter admits, or None when it admits nothing."""
        tenant = self._tenants.by_value.get(where.tenant)
        if tenant is None:
            return None
        n = self._size
        mask = self._alive[:n] & (self._tenant[:n] == tenant)
        documents = None
        if where.document_ids:
            documents = set(self._documents.find(where.document_ids))
        if where.tags:
            wanted = set(where.tags)
            tagged = {d for d, tags in self._document_tags.items() if wanted <= tags}
            documents = tagged if documents is None else documents & tagged
        if documents is not None:
            if not documents:
                return None
            mask &= np.isin(self._document[:n], np.fromiter(documents, dtype=np.int32))
        if where.mime_types:
            mimes = self._mimes.find(where.mime_types)
            if not mimes:
                return None
            mask &= np.isin(self._mime[:n], np.asarray(mimes, dtype=np.int32))
        return mask

    def keyword(self, query: str, where: Filter, limit: int) -> list[tuple[str, float]]:
        """BM25 over the tenant's chunks; statistics are the tenant's own."""
        terms = list(dict.fromkeys(self.analyzer.terms(query)))
        with self._lock:
            mask = self._mask(where)
            if mask is None or not terms:
                return []
            n = self._size
            tenant_slots = self._alive[:n] & (self._tenant[:n] == self._tenant_code(where))
            total = int(tenant_slots.sum())
            average_length = float(self._length[:n][tenant_slots].mean()) if total else 1.0
            scores = np.zeros(n, dtype=np.float32)
            for term in terms:
                postings = self._postings.get(term)
                if postings is None:
                    continue
                slots = np.frombuffer(postings[0], dtype=np.int32)
                frequencies = np.frombuffer(postings[1], dtype=np.float32)
                frequency_in_tenant = int(tenant_slots[slots].sum())
                if frequency_in_tenant == 0:
                    continue
                idf = np.log1p((total - frequency_in_tenant + 0.5) / (frequency_in_tenant + 0.5))
                norm = self.k1 * (1 - self.b + self.b * self._length[slots] / average_length)
                scores[slots] += idf * frequencies * (self.k1 + 1) / (frequencies + norm)
            scores[~mask] = 0
            return self._top(scores, limit)

    def _tenant_code(self, where: Filter) -> int:
        return self._tenants.by_value[where.tenant]

    def _top(self, scores: np.ndarray, limit: int) -> list[tuple[str, float]]:
        """The best `limit` slots with a positive score, best first."""
        if len(scores) > limit:
            candidates = np.argpartition(-scores, limit)[:limit]
        else:
            candidates = np.arange(len(scores))
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        return [(self._chunk_ids[slot], float(scores[slot])) for slot in order if scores[slot] > 0]
