"""Runs the sessions service: `python -m services.sessions`."""

from services.common.main import run_service
from services.sessions.app import start
from services.sessions.settings import SessionsSettings

if __name__ == "__main__":
    run_service(SessionsSettings, start)
