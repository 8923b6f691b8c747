"""A throwaway PostgreSQL server from the machine's binaries: the suite's shared one
(tests/conftest.py) and the fault tests' own, which they stop and start."""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def running(prefix: str) -> Iterator[tuple[object, int]]:
    """Starts a server in a fresh folder (not under pytest's tmp_path, which the postgres
    user cannot enter); yields its executor and port, then removes the folder."""
    from pytest_postgresql.executors import PostgreSQLExecutor

    executable = _binary("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: pg_ctl runs as the postgres user instead.
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
    try:
        with executor:
            wait_until_accepting(port)
            yield executor, port
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.skip("PostgreSQL server binaries not installed (make setup installs them)")
    return found[-1]


def wait_until_accepting(port: int, seconds: float = 60) -> None:
    """Returns once the server at port accepts connections. The executor's own wait ends
    when the postmaster runs, while it may still answer "the database system is starting
    up" (recovery after a stop); pg_isready succeeds only when connections are accepted."""
    deadline = time.monotonic() + seconds
    while True:
        ready = subprocess.run(
            [_binary("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
        )
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"PostgreSQL on port {port} refused connections for {seconds} s")
        time.sleep(0.1)


def create_database(port: int, name: str) -> str:
    """A fresh database on the server at port; its SQLAlchemy URL."""
    from pytest_postgresql.janitor import DatabaseJanitor

    DatabaseJanitor(user="postgres", host="127.0.0.1", port=port, dbname=name).init()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{name}"
