"""Starts the llm service: python -m services.llm."""

from services.common.main import run_service
from services.llm.app import start
from services.llm.settings import LlmSettings

if __name__ == "__main__":
    run_service(LlmSettings, start)
