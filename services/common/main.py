"""Entry point shared by every service's __main__: settings, logging, serve, drain."""

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from services.common.logs import configure_logging
from services.common.server import RunningServer, run_until_signalled
from services.common.settings import ServiceSettings
from services.common.tracing import configure_tracing

_LOGGER = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)


class App(Protocol):
    server: RunningServer

    async def close(self) -> None: ...


def run_service(settings_class: type[S], start: Callable[[S], Awaitable[App]]) -> None:
    """Builds settings from the environment, starts the app, serves until signalled."""
    if unknown := settings_class.unknown_variables(os.environ):
        sys.exit(
            f"unknown settings for {settings_class.__name__}: {'; '.join(unknown)}. "
            "Each of the service's variables must name one of its settings (README, "
            "Configuration)."
        )
    try:
        settings = settings_class()
    except ValidationError as exc:
        sys.exit(f"invalid settings for {settings_class.__name__}:\n{exc}")
    except SettingsError as exc:
        # A list or mapping setting that is not JSON: pydantic-settings names the field.
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        sys.exit(f"invalid settings for {settings_class.__name__}: {exc}{cause}")
    configure_logging(settings.log_level, settings.log_json)
    configure_tracing(settings.service_name(), settings.otlp_endpoint)

    async def serve() -> None:
        try:
            app = await start(settings)
        except ValueError as exc:
            sys.exit(f"cannot start: {exc}")
        await run_until_signalled(app.server, app.close)

    asyncio.run(serve())
