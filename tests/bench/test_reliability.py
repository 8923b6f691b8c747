"""bench.reliability's plugin and tables on a small pytest run of its own: what a user
reads must count a failed or erring check as not passed, never as survived."""

from collections import Counter

from bench.reliability import (
    FUZZ,
    FUZZED,
    ISOLATION,
    Collector,
    Ran,
    faults_part,
    fuzz_part,
    grouped_part,
)

pytest_plugins = ["pytester"]

FAULT_TESTS = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("the mesh did not start")

def test_ingest_killed_while_parsing_loses_nothing():
    pass

def test_llm_killed_mid_stream_keeps_the_question():
    assert False, "the question was lost"

def test_sessions_killed_mid_answer_leaves_whole_rows(broken):
    pass
"""


def test_a_failed_or_erring_fault_is_not_survived(pytester):
    pytester.makepyfile(**{"tests/faults/test_kills": FAULT_TESTS})
    collector = Collector()
    pytester.inline_run("-p", "no:cacheprovider", "-p", "no:asyncio", plugins=[collector])
    outcomes = {nodeid.rpartition("::")[2]: ran.outcome for nodeid, ran in collector.tests.items()}
    assert outcomes == {
        "test_ingest_killed_while_parsing_loses_nothing": "passed",
        "test_llm_killed_mid_stream_keeps_the_question": "failed",
        "test_sessions_killed_mid_answer_leaves_whole_rows": "error",
    }
    lines, summary = faults_part(collector.tests)
    assert summary == "faults survived 1/3"
    assert any(
        "llm killed mid stream keeps the question" in line and "failed" in line for line in lines
    )


def test_fuzz_rows_count_examples_and_statuses_per_rpc():
    tests = {
        f"{FUZZ}::test_every_served_rpc_is_fuzzed": Ran(),
        f"{FUZZ}::{FUZZED}[/ragmesh.a.v1.A/Get]": Ran(),
        f"{FUZZ}::{FUZZED}[/ragmesh.a.v1.A/Put]": Ran("failed"),
    }
    fuzz = {
        "/ragmesh.a.v1.A/Get": Counter({"INVALID_ARGUMENT": 20, "OK": 5}),
        "/ragmesh.a.v1.A/Put": Counter({"OK": 3, "INTERNAL": 1}),
    }
    lines, summary = fuzz_part(tests, fuzz)
    assert summary == "fuzz 1/2 RPCs, 29 examples"
    rows = {line.split()[0]: line.split(maxsplit=3)[1:] for line in lines if line.startswith("/")}
    assert rows == {
        "/ragmesh.a.v1.A/Get": ["25", "passed", "INVALID_ARGUMENT 20, OK 5"],
        "/ragmesh.a.v1.A/Put": ["4", "failed", "OK 3, INTERNAL 1"],
    }
    assert "every served rpc is fuzzed: passed" in lines


def test_isolation_groups_cases_and_names_those_not_passed():
    tests = {
        f"{ISOLATION}::test_another_tenants_id_is_not_found[ingest:GetDocument]": Ran(),
        f"{ISOLATION}::test_another_tenants_id_is_not_found[sessions:GetSession]": Ran("failed"),
        f"{ISOLATION}::test_alphas_data_is_intact": Ran(),
    }
    lines, summary = grouped_part(tests, ISOLATION, "isolation", "isolation checks")
    assert summary == "isolation checks 2/3"
    assert any(
        line.split()
        == ["another", "tenants", "id", "is", "not", "found", "1/2", "sessions:GetSession"]
        for line in lines
    )
