"""Automatic tags: the keyphrases of a session, chosen with the embedding model.

Candidates are the conversation's words and word pairs (stop words dropped, the most
frequent first); each is embedded and scored by its closeness to the conversation as a
whole, and the tags are picked by maximal marginal relevance so they are about the
conversation without repeating one another. The same messages always give the same tags.
"""

import itertools
import re
from collections import Counter

import numpy as np

from services.common.database import Database, utcnow
from services.common.text import Analyzer
from services.sessions import storage
from services.sessions.upstreams import Embed

CANDIDATES = 40
# Messages of the session the tags are taken from (the latest).
MESSAGES = 40
# Characters of the conversation embedded as its summary vector.
SUMMARY_CHARS = 2000
MMR_LAMBDA = 0.7
_LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)
# Where a keyphrase cannot run on: sentence ends and line breaks.
_SENTENCE = re.compile(r"[.!?;:]+\s+|\n+")


def candidates(analyzer: Analyzer, text: str, limit: int = CANDIDATES) -> list[str]:
    """Words and adjacent word pairs within a sentence, most frequent first; a pair and its
    reverse ("capital france", "france capital") count as one, in its commoner order."""
    counts: Counter[str] = Counter()
    pairs: dict[frozenset[str], Counter[str]] = {}
    for sentence in _SENTENCE.split(text):
        words = [w for w in analyzer.words(sentence) if len(w) >= 3 and _LETTERS.search(w)]
        counts.update(words)
        for a, b in itertools.pairwise(words):
            if a != b:
                pairs.setdefault(frozenset((a, b)), Counter())[f"{a} {b}"] += 1
    for forms in pairs.values():
        ((form, _),) = forms.most_common(1)
        counts[form] = sum(forms.values())
    ranked = sorted(counts, key=lambda phrase: (-counts[phrase], phrase))
    return ranked[:limit]


def pick(phrases: list[str], vectors: np.ndarray, summary: np.ndarray, k: int) -> list[str]:
    """Maximal marginal relevance over unit vectors: relevant to summary, not redundant."""
    relevance = vectors @ summary
    chosen: list[int] = []
    while len(chosen) < min(k, len(phrases)):
        best, best_score = -1, -np.inf
        for i in range(len(phrases)):
            if i in chosen:
                continue
            redundancy = max((float(vectors[i] @ vectors[j]) for j in chosen), default=0.0)
            score = MMR_LAMBDA * float(relevance[i]) - (1 - MMR_LAMBDA) * redundancy
            if score > best_score:
                best, best_score = i, score
        chosen.append(best)
    return [phrases[i] for i in chosen]


class Tagger:
    def __init__(self, database: Database, embed: Embed, count: int) -> None:
        self._db = database
        self._embed = embed
        self._count = count
        self._analyzer = Analyzer()

    async def update(self, tenant: str, session_id: str) -> None:
        if self._count == 0:
            return
        async with self._db.read() as db:
            text = await storage.session_text(db, tenant, session_id, MESSAGES)
        phrases = candidates(self._analyzer, text)
        tags: list[str] = []
        if phrases:
            embedded = np.asarray(
                await self._embed.embed([text[-SUMMARY_CHARS:], *phrases], query=False),
                np.float32,
            )
            tags = pick(phrases, embedded[1:], embedded[0], self._count)
        async with self._db.write() as db:
            row = await storage.lock_session(db, tenant, session_id)
            if row is not None:
                await storage.replace_tags(db, row, storage.TAG_AUTO, tags)
                row.updated_at = utcnow()
