"""Runs the ingest service: `python -m services.ingest`."""

from services.common.main import run_service
from services.ingest.app import start
from services.ingest.settings import IngestSettings

if __name__ == "__main__":
    run_service(IngestSettings, start)
