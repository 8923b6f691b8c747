"""Starts the telemetry service: python -m services.telemetry."""

from services.common.main import run_service
from services.telemetry.app import start
from services.telemetry.settings import TelemetrySettings

if __name__ == "__main__":
    run_service(TelemetrySettings, start)
