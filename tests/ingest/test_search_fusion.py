"""Fusion of the keyword and semantic channels, and query checks, without a server."""

import pytest

from services.common.errors import InvalidArgument
from services.ingest.search import (
    check_query,
    convex_fusion,
    reciprocal_rank_fusion,
    top_ratio_fusion,
)


def test_top_ratio_fusion_divides_each_channel_by_its_top_score():
    keyword = [("a", 12.0), ("b", 6.0), ("c", 3.0)]
    semantic = [("b", 0.8), ("d", 0.6), ("a", 0.4)]
    fused = top_ratio_fusion(keyword, semantic, semantic_weight=0.7)
    assert fused["a"] == pytest.approx(0.3 * 1.0 + 0.7 * 0.5)
    assert fused["b"] == pytest.approx(0.3 * 0.5 + 0.7 * 1.0)
    # Missing from a channel: that channel's lowest ratio, not zero.
    assert fused["c"] == pytest.approx(0.3 * 0.25 + 0.7 * 0.5)
    assert fused["d"] == pytest.approx(0.3 * 0.25 + 0.7 * 0.75)
    assert sorted(fused, key=fused.get, reverse=True) == ["b", "a", "d", "c"]


def test_top_ratio_fusion_lets_a_steep_keyword_list_outrank_a_flat_semantic_one():
    """A rare identifier matched by one chunk: BM25 puts it far ahead, while the cosine
    scores of every candidate are alike. Min-max stretches the flat semantic list to 0..1
    and lets it decide; dividing by the top keeps it flat, so the exact match wins."""
    keyword = [("exact", 20.0), ("x", 4.0), ("y", 3.0)]
    semantic = [("x", 0.62), ("y", 0.61), ("exact", 0.58)]
    ratio = top_ratio_fusion(keyword, semantic, semantic_weight=0.7)
    assert max(ratio, key=ratio.get) == "exact"
    convex = convex_fusion(keyword, semantic, semantic_weight=0.7)
    assert max(convex, key=convex.get) == "x"


def test_top_ratio_fusion_with_one_channel_or_negative_scores():
    assert top_ratio_fusion([], [], semantic_weight=0.7) == {}
    single = top_ratio_fusion([], [("x", 0.8), ("y", 0.4)], semantic_weight=0.7)
    assert single == {"x": pytest.approx(0.7), "y": pytest.approx(0.35)}
    # Cosine similarity can be negative: it counts as 0, and a top at or below 0 as 1.
    negative = top_ratio_fusion([], [("x", 0.5), ("y", -0.2)], semantic_weight=0.7)
    assert negative["y"] == pytest.approx(0.0)
    flat = top_ratio_fusion([], [("x", -0.1), ("y", -0.3)], semantic_weight=0.7)
    assert flat == {"x": pytest.approx(0.7), "y": pytest.approx(0.7)}


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
