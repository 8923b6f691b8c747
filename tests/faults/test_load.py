"""A short run of the load generator (bench/load.py) on the real mesh as processes:
concurrent chat streams, uploads and searches. It asserts what users rely on, never a
timing: no call fails with INTERNAL or UNKNOWN, and nothing is lost (every accepted upload
ends READY or FAILED, every chat stream ends with a stored answer or a status)."""

from bench.load import GIVEN_UP, Load, report, run_load
from ragmesh.sessions.v1 import sessions_pb2

DEFINED_ENDS = {
    sessions_pb2.FinishReason.Name(reason)
    for reason in (
        sessions_pb2.FINISH_REASON_EOS,
        sessions_pb2.FINISH_REASON_LENGTH,
        sessions_pb2.FINISH_REASON_STOP,
    )
}


async def test_short_load_fails_nothing_and_loses_nothing(mesh, models):
    await mesh.start("ingest", "sessions")
    load = Load(seconds=15, streams=4, uploads=2, searches=1, answer_tokens=16, documents=False)
    result = await run_load(
        {name: mesh.target(name) for name in ("ingest", "sessions")},
        load,
        lambda: {**models.rss(), **mesh.rss()},
    )
    print(report(result, load))
    stats = result.stats
    assert result.ok, stats.failures
    assert not {code for counter in stats.statuses.values() for code in counter} & {
        "INTERNAL",
        "UNKNOWN",
    }
    assert stats.uploads and sum(result.documents.values()) == len(stats.uploads)
    assert set(result.documents) <= {"DOCUMENT_STATUS_READY", "DOCUMENT_STATUS_FAILED"}
    # Every stream ended with a stored answer (a defined finish reason) or a status.
    assert sum(stats.stream_ends.values()) == sum(stats.statuses["SendMessage"].values()) > 0
    assert {end for end in stats.stream_ends if not end.startswith("status ")} <= DEFINED_ENDS
    # Each question is counted once: a question refused r times made r calls if it was
    # given up at the end, r + 1 if it was resent until it got an answer or another status.
    # A stream gives up once at most: its time is up then.
    given_up = stats.questions[GIVEN_UP]
    calls = sum(stats.statuses["SendMessage"].values())
    assert calls == sum(stats.questions.values()) + stats.refusals - given_up
    assert given_up <= load.streams
    assert set(result.rss_warm) == {"embed", "llm", "ingest", "sessions"}
