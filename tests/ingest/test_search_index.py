"""The in-process keyword index: analyzer, BM25 ranking, filters, deletes."""

import pytest

from services.common.text import Analyzer
from services.ingest.search_index import Filter, IndexedChunk, SearchIndex


def chunk(chunk_id, text, document="d1", tenant="t", tags=(), mime="text/plain"):
    return IndexedChunk(chunk_id, document, tenant, mime, tuple(tags), text)


@pytest.fixture
def index():
    return SearchIndex(Analyzer())


def test_analyzer_folds_case_drops_stopwords_and_stems():
    analyzer = Analyzer()
    assert analyzer.terms("The Compressed ARCHIVES of the directories") == [
        "compress",
        "archiv",
        "directori",
    ]
    assert analyzer.words("Ｃａｆé") == ["café"]
    assert analyzer.matched_words("compressing archives quickly", "Compress an archive.") == [
        "compressing",
        "archives",
    ]


@pytest.mark.parametrize(
    "query",
    ['"unbalanced', "*", "a:b", "((", "x AND OR NEAR y", "'; DROP TABLE chunks; --", "", "🙂"],
)
def test_any_query_text_is_safe(index, query):
    index.add([chunk("c1", "drop table statements in SQL")])
    assert isinstance(index.keyword(query, Filter("t"), 10), list)


def test_bm25_prefers_rarer_terms_and_more_occurrences(index):
    index.add(
        [
            chunk("c1", "python copies files"),
            chunk("c2", "python removes directory trees, directory after directory"),
            chunk("c3", "python lists a directory"),
            chunk("c4", "python python python"),
        ]
    )
    ranked = [cid for cid, _ in index.keyword("remove a directory", Filter("t"), 10)]
    assert ranked[:2] == ["c2", "c3"]
    assert "c1" not in ranked and "c4" not in ranked
    scores = dict(index.keyword("directory", Filter("t"), 10))
    assert scores["c2"] > scores["c3"] > 0


def test_tenants_never_see_each_other(index):
    index.add(
        [chunk("a", "secret plans", tenant="acme"), chunk("b", "secret plans", tenant="globex")]
    )
    assert [c for c, _ in index.keyword("secret", Filter("acme"), 10)] == ["a"]
    assert index.keyword("secret", Filter("nobody"), 10) == []


def test_filters_by_document_tag_and_mime(index):
    index.add(
        [
            chunk("c1", "alpha beta", document="d1", tags=["x", "y"], mime="application/pdf"),
            chunk("c2", "alpha gamma", document="d2", tags=["x"], mime="text/plain"),
            chunk("c3", "alpha delta", document="d3", tags=[], mime="text/plain"),
        ]
    )

    def ids(where):
        return sorted(c for c, _ in index.keyword("alpha", where, 10))

    assert ids(Filter("t", document_ids=["d2", "d3"])) == ["c2", "c3"]
    assert ids(Filter("t", tags=["x"])) == ["c1", "c2"]
    assert ids(Filter("t", tags=["x", "y"])) == ["c1"]
    assert ids(Filter("t", mime_types=["text/plain"])) == ["c2", "c3"]
    assert ids(Filter("t", document_ids=["missing"])) == []
    assert ids(Filter("t", tags=["x"], document_ids=["d3"])) == []


def test_removed_documents_leave_keyword_search(index):
    index.add([chunk("c1", "kept words", document="d1"), chunk("c2", "gone words", document="d2")])
    assert index.remove_document("d2") == 1
    assert [c for c, _ in index.keyword("words", Filter("t"), 10)] == ["c1"]
    assert not index.has_document("d2") and index.has_document("d1")
    assert len(index) == 1


def test_grows_past_initial_capacity(index):
    index.add([chunk(f"c{i}", f"word{i % 7} common", document=f"d{i}") for i in range(2500)])
    assert len(index) == 2500
    assert len(index.keyword("word3", Filter("t"), 1000)) == len(range(3, 2500, 7))
