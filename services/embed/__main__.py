"""Runs the embed service: `python -m services.embed`."""

from services.common.main import run_service
from services.embed.app import start
from services.embed.settings import EmbedSettings

if __name__ == "__main__":
    run_service(EmbedSettings, start)
