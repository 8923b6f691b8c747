"""Alembic environment: runs on the connection the ingest service hands it at start."""

from services.common.database import run_alembic_env
from services.ingest.storage import Base

run_alembic_env(Base.metadata)
