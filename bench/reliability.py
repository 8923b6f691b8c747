"""The reliability figures in one run: faults, hostile callers and load.

    python -m bench.reliability [--seconds 60] [--fuzz-examples 25] [--skip-load]
    make chaos

It runs pytest in this process on tests/faults (the services as processes killed with
SIGKILL and restarted) and tests/hostile (Hypothesis over every RPC, the tenant-isolation
matrix, the inputs fuzzing found), with a plugin that keeps each test's outcome and the
fuzz log's statuses per RPC; then bench.load for --seconds on a mesh of its own (skipped
with --skip-load). It prints one table per part: faults injected and survived, fuzz
examples per RPC with their statuses, isolation checks passed, the regression inputs,
and the load's requests, latencies, errors by status and each process's RSS; then one
summary line. The load average is printed at the start and at the end.

Exit status 1 when a test failed or erred, or the load failed a call with INTERNAL or
UNKNOWN or lost something.
"""

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from bench.load import Load, Result, report, run_on_mesh

REPO = Path(__file__).resolve().parents[1]
FAULTS = "tests/faults/"
FUZZ = "tests/hostile/test_fuzz.py"
ISOLATION = "tests/hostile/test_isolation.py"
REGRESSIONS = "tests/hostile/test_regressions.py"
# The fuzz test's parameter is the RPC's path: test_hostile_input_gets_a_defined_status[/a.B/C].
FUZZED = "test_hostile_input_gets_a_defined_status"


@dataclasses.dataclass
class Ran:
    outcome: str = "passed"
    seconds: float = 0.0


class Collector:
    """A pytest plugin: each test's outcome (a failure in setup or teardown is an error)
    and seconds, and at the end the fuzz log's statuses per RPC."""

    def __init__(self) -> None:
        self.tests: dict[str, Ran] = {}
        self.fuzz: dict[str, Counter] = {}

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.tests[report.nodeid] = Ran("error")

    def pytest_runtest_logreport(self, report) -> None:
        ran = self.tests.setdefault(report.nodeid, Ran())
        ran.seconds += report.duration
        if report.failed:
            ran.outcome = "failed" if report.when == "call" else "error"
        elif report.skipped and ran.outcome == "passed":
            ran.outcome = "skipped"

    def pytest_sessionfinish(self, session) -> None:
        # tests/hostile's support module, imported by its conftest under this name.
        support = sys.modules.get("hostile_support")
        if support is not None:
            self.fuzz = {
                path: Counter(counts) for path, counts in support.FUZZ_LOG.outcomes.items()
            }


def _words(nodeid: str) -> str:
    """A test's name as words: test_a_b[x] -> 'a b [x]'."""
    name = nodeid.rpartition("::")[2].removeprefix("test_")
    base, bracket, param = name.partition("[")
    return base.replace("_", " ") + (f" [{param}" if bracket else "")


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [headers, *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in cells
    ]


def _statuses(counts: Counter) -> str:
    return ", ".join(f"{code} {n}" for code, n in counts.most_common()) or "none"


def _passed(tests: dict[str, Ran]) -> tuple[int, int]:
    return sum(ran.outcome == "passed" for ran in tests.values()), len(tests)


def _under(tests: dict[str, Ran], prefix: str) -> dict[str, Ran]:
    return {nodeid: ran for nodeid, ran in tests.items() if nodeid.startswith(prefix)}


def faults_part(tests: dict[str, Ran]) -> tuple[list[str], str]:
    faults = _under(tests, FAULTS)
    rows = [
        [
            _words(nodeid),
            nodeid.removeprefix(FAULTS).partition("::")[0],
            ran.outcome,
            f"{ran.seconds:.0f}",
        ]
        for nodeid, ran in faults.items()
    ]
    passed, total = _passed(faults)
    lines = ["faults (killed with SIGKILL, stopped, restarted):"]
    lines += _table(["fault and what must hold", "file", "outcome", "s"], rows)
    lines.append(f"faults survived: {passed} of {total}")
    return lines, f"faults survived {passed}/{total}"


def fuzz_part(tests: dict[str, Ran], fuzz: dict[str, Counter]) -> tuple[list[str], str]:
    runs = {
        nodeid.partition("[")[2].removesuffix("]"): ran
        for nodeid, ran in _under(tests, f"{FUZZ}::{FUZZED}[").items()
    }
    rows = [
        [
            path,
            sum(fuzz.get(path, Counter()).values()),
            ran.outcome,
            _statuses(fuzz.get(path, Counter())),
        ]
        for path, ran in sorted(runs.items())
    ]
    every = Counter()
    for counts in fuzz.values():
        every.update(counts)
    passed, total = _passed(runs)
    lines = [
        "fuzz (Hypothesis, every RPC; a status with a message, never INTERNAL, UNKNOWN or a hang):"
    ]
    lines += _table(["rpc", "examples", "outcome", "statuses"], rows)
    others = _under(tests, FUZZ).keys() - {f"{FUZZ}::{FUZZED}[{path}]" for path in runs}
    lines += [f"{_words(nodeid)}: {tests[nodeid].outcome}" for nodeid in sorted(others)]
    examples = sum(every.values())
    lines.append(f"fuzz: {passed} of {total} RPCs held, {examples} examples ({_statuses(every)})")
    return lines, f"fuzz {passed}/{total} RPCs, {examples} examples"


def grouped_part(tests: dict[str, Ran], file: str, title: str, label: str) -> tuple[list[str], str]:
    """One row per test function: its parametrized cases passed of all."""
    groups: dict[str, dict[str, Ran]] = defaultdict(dict)
    for nodeid, ran in _under(tests, f"{file}::").items():
        groups[_words(nodeid.partition("[")[0])][nodeid] = ran
    rows = []
    for name, cases in groups.items():
        passed, total = _passed(cases)
        failing = [
            _words(nodeid).partition(" [")[2].removesuffix("]")
            for nodeid, ran in cases.items()
            if ran.outcome != "passed"
        ]
        rows.append([name, f"{passed}/{total}", ", ".join(failing) or "-"])
    passed, total = _passed(_under(tests, f"{file}::"))
    lines = [f"{title}:", *_table(["check", "passed", "not passed"], rows)]
    lines.append(f"{label}: {passed} of {total} passed")
    return lines, f"{label} {passed}/{total}"


def load_part(result: Result, load: Load) -> tuple[list[str], str]:
    stats = result.stats
    errors = Counter()
    for counter in stats.statuses.values():
        errors.update({code: n for code, n in counter.items() if code != "OK"})
    summary = (
        f"load {stats.requests} requests, errors {_statuses(errors)}, "
        f"failures {len(stats.failures)}"
    )
    return ["load (bench.load on the mesh as processes):", report(result, load)], summary


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60, help="the load's length (60)")
    parser.add_argument("--fuzz-examples", type=int, default=25, help="examples per RPC (25)")
    parser.add_argument("--skip-load", action="store_true", help="faults and hostile callers only")
    args = parser.parse_args(argv)
    if not 0 < args.seconds < math.inf or args.fuzz_examples < 1:
        parser.error("--seconds must be a positive number and --fuzz-examples at least 1")
    started = time.monotonic()
    print(f"start: {_load_average()}", flush=True)
    os.environ["RAGMESH_FUZZ_EXAMPLES"] = str(args.fuzz_examples)
    collector = Collector()
    code = pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            f"--rootdir={REPO}",
            str(REPO / FAULTS),
            str(REPO / "tests" / "hostile"),
        ],
        plugins=[collector],
    )
    parts = [
        faults_part(collector.tests),
        fuzz_part(collector.tests, collector.fuzz),
        grouped_part(
            collector.tests,
            ISOLATION,
            "tenant isolation (tenant beta on alpha's ids and data)",
            "isolation checks",
        ),
        grouped_part(
            collector.tests, REGRESSIONS, "regressions (inputs fuzzing found)", "regressions"
        ),
    ]
    failed = [f"pytest exit {int(code)}"] if code != pytest.ExitCode.OK else []
    if not args.skip_load:
        load = Load(args.seconds)
        with tempfile.TemporaryDirectory(prefix="ragmesh-reliability-") as root:
            result = asyncio.run(run_on_mesh(load, Path(root)))
        parts.append(load_part(result, load))
        if not result.ok:
            failed.append("the load failed a call or lost something")
    for lines, _ in parts:
        print("\n" + "\n".join(lines))
    print(f"\nend: {_load_average()}; {time.monotonic() - started:.0f} s in all")
    verdict = f"FAILED ({', '.join(failed)})" if failed else "OK"
    print(f"reliability: {'; '.join(summary for _, summary in parts)}: {verdict}", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
