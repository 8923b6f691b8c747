"""What every test run shares: no model hub, ever, a throwaway PostgreSQL server, and the
real mesh for tests that drive it from outside (tests/live_mesh.py)."""

import itertools
import os

import pytest
import throwaway_postgres

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["live_mesh"]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server; yields a function that creates a fresh database."""
    names = itertools.count()
    with throwaway_postgres.running("ragmesh-pg-") as (_, port):
        yield lambda: throwaway_postgres.create_database(port, f"ragmesh_{next(names)}")
