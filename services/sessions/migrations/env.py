"""Alembic environment: runs on the connection the sessions service hands it at start."""

from services.common.database import run_alembic_env
from services.sessions.storage import Base

run_alembic_env(Base.metadata)
