"""Text analysis shared by every keyword match in the mesh: ingest's BM25 and sessions'
name, tag and keyphrase matching analyse words the same way."""

import re
import threading
import unicodedata

import snowballstemmer

# Common English function words: they match nearly every chunk and only add noise.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_TERM_CHARS = 64


class Analyzer:
    """Text to index terms: Unicode words, case-folded, stop words dropped, stemmed."""

    def __init__(self) -> None:
        self._stemmer = snowballstemmer.stemmer("english")
        self._stems: dict[str, str] = {}
        self._lock = threading.Lock()

    def words(self, text: str) -> list[str]:
        """The searchable words of text, case-folded, before stemming."""
        text = unicodedata.normalize("NFKC", text).casefold()
        return [w for w in _WORD.findall(text) if w not in STOPWORDS and len(w) <= MAX_TERM_CHARS]

    def stem(self, word: str) -> str:
        stem = self._stems.get(word)
        if stem is None:
            # Stemming is slow (tens of µs); vocabularies are small, so cache every word.
            with self._lock:
                stem = self._stems[word] = self._stemmer.stemWord(word)
        return stem

    def terms(self, text: str) -> list[str]:
        return [self.stem(w) for w in self.words(text)]

    def matched_words(self, query: str, text: str) -> list[str]:
        """The query's words whose stems occur in text, in query order, once each."""
        present = {self.stem(word) for word in set(self.words(text))}
        found: list[str] = []
        for word in self.words(query):
            if self.stem(word) in present and word not in found:
                found.append(word)
        return found
