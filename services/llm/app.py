"""Assembles the llm service: settings, generation config store, model manager, gRPC server."""

import logging
from dataclasses import dataclass

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.server import RunningServer, ServiceSpec, create_server
from services.llm.genconfig import GenerationConfigStore
from services.llm.loading import LoadOptions
from services.llm.manager import ModelManager
from services.llm.servicer import LlmServicer
from services.llm.settings import LlmSettings

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


@dataclass
class LlmApp:
    server: RunningServer
    manager: ModelManager
    config: GenerationConfigStore

    async def close(self) -> None:
        await self.manager.close()


async def start(settings: LlmSettings) -> LlmApp:
    """Starts the server (NOT_SERVING) and, when configured, loads the default model."""
    config = GenerationConfigStore(settings.data_dir / "llm" / "generation_config.json")
    holder: dict = {}

    async def on_serving(serving: bool) -> None:
        await holder["server"].set_serving(serving)

    manager = ModelManager(settings, config, on_serving)
    servicer = LlmServicer(settings, manager, config)
    running = await create_server(
        settings,
        [ServiceSpec(SERVICE_NAME, servicer, llm_pb2_grpc.add_LlmServiceServicer_to_server)],
        serving=False,
    )
    holder["server"] = running
    running.metrics.watch_queue("decode", manager.queue_figures)
    if settings.default_model:
        try:
            await manager.load(LoadOptions(model=settings.default_model))
        except Exception as exc:
            # A bad default must not keep the service down: it starts and reports the failure.
            _LOGGER.error("cannot load the default model %s: %s", settings.default_model, exc)
    return LlmApp(running, manager, config)
