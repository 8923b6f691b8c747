"""Fusion of the keyword and semantic channels, and query checks, without a server."""

import pytest

from services.common.errors import InvalidArgument
from services.ingest.search import check_query, convex_fusion, reciprocal_rank_fusion


def test_convex_fusion_weights_normalised_scores():
    keyword = [("a", 12.0), ("b", 6.0), ("c", 2.0)]
    semantic = [("b", 0.9), ("d", 0.5), ("a", 0.1)]
    fused = convex_fusion(keyword, semantic, semantic_weight=0.7)
    assert fused["a"] == pytest.approx(0.3 * 1.0 + 0.7 * 0.0)
    assert fused["b"] == pytest.approx(0.3 * 0.4 + 0.7 * 1.0)
    assert fused["c"] == pytest.approx(0.0)
    assert fused["d"] == pytest.approx(0.7 * 0.5)
    assert max(fused, key=fused.get) == "b"


def test_convex_fusion_with_one_empty_channel_keeps_the_other_order():
    fused = convex_fusion([], [("x", 0.8), ("y", 0.4)], semantic_weight=0.7)
    assert sorted(fused, key=fused.get, reverse=True) == ["x", "y"]
    single = convex_fusion([("only", 3.0)], [], semantic_weight=0.7)
    assert single == {"only": pytest.approx(0.3)}


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "c"]], k=60)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61)
    assert max(fused, key=fused.get) == "b"


@pytest.mark.parametrize(
    ("text", "top_k", "field"),
    [
        ("", 10, "query"),
        (" \n", 10, "query"),
        ("q" * 4097, 10, "query"),
        ("ok", 0, "top_k"),
        ("ok", 101, "top_k"),
    ],
)
def test_query_checks_name_the_field(text, top_k, field):
    with pytest.raises(InvalidArgument) as caught:
        check_query(text, top_k)
    assert caught.value.field_violations[0][0] == field
