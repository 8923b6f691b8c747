"""What every test run shares: no model hub, ever, a throwaway PostgreSQL server, and the
real mesh for tests that drive it from outside (tests/live_mesh.py)."""

import glob
import itertools
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["live_mesh"]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server; yields a function that creates a fresh database."""
    from pytest_postgresql.executors import PostgreSQLExecutor
    from pytest_postgresql.janitor import DatabaseJanitor

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.skip("PostgreSQL server binaries not installed (make setup installs them)")
    base = Path(tempfile.mkdtemp(prefix="ragmesh-pg-"))
    executable = found[-1]
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run pg_ctl as the postgres user instead.
        base.chmod(0o755)
        shutil.chown(base, "postgres")
        wrapper = base / "pg_ctl"
        wrapper.write_text(f'#!/bin/sh\nexec runuser -u postgres -- {executable} "$@"\n')
        wrapper.chmod(0o755)
        executable = str(wrapper)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = PostgreSQLExecutor(
        executable=executable,
        host="127.0.0.1",
        port=port,
        datadir=str(base / "data"),
        unixsocketdir=str(base),
        logfile=str(base / "postgres.log"),
        startparams="-w",
        dbname="postgres",
    )
    names = itertools.count()
    with executor:
        executor.wait_for_postgres()

        def create_database() -> str:
            name = f"ragmesh_{next(names)}"
            DatabaseJanitor(user="postgres", host="127.0.0.1", port=port, dbname=name).init()
            return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{name}"

        yield create_database
    shutil.rmtree(base, ignore_errors=True)
