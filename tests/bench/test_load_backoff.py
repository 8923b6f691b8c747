"""bench.load's backoff for a refused question: a client that waits longer after each
refusal, up to a bound, and not in step with the other refused streams."""

import random

from bench.load import BACKOFF_MOST_SECONDS, backoff_seconds


def test_refused_questions_wait_doubling_up_to_the_bound_with_jitter():
    rng = random.Random(7)
    for refusals, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (12, 30)]:
        waits = [backoff_seconds(refusals, rng) for _ in range(200)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (refusals, waits)
        # Jittered: refused streams spread out instead of resending together.
        assert max(waits) - min(waits) > ceiling / 4
    assert backoff_seconds(1000, rng) <= BACKOFF_MOST_SECONDS
