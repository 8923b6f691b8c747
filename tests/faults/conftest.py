"""Fixtures for the fault tests: the real services as processes (bench.load.ProcessMesh),
killed with SIGKILL and started again on the same ports and data.

embed and llm (slow to start: a model each) run once for the whole run in `models`;
each test gets its own ingest and sessions in `mesh`, on fresh data folders. A test that
kills embed or llm there has it started again when it ends."""

import pytest
from harness import INGEST

from bench.load import ProcessMesh


@pytest.fixture(scope="session")
async def models(tmp_path_factory):
    mesh = ProcessMesh(tmp_path_factory.mktemp("models"))
    try:
        await mesh.start("embed", "llm")
        yield mesh
    finally:
        await mesh.close()


@pytest.fixture
async def mesh(models, tmp_path):
    """ingest and sessions of this test (started with mesh.start) on models' embed and
    llm; what the test killed of those is started again."""
    own = ProcessMesh(
        tmp_path,
        extra_env={"ingest": dict(INGEST)},
        elsewhere={name: models.target(name) for name in ("embed", "llm")},
    )
    try:
        yield own
    finally:
        await own.close()
        for name in ("embed", "llm"):
            if name not in models.processes:
                await models.start(name)
