"""Fixtures for the embed tests: the real model, its ONNX export, a real server on port 0.

The server starts the way a fresh install does: no export at hand, so it exports the
packaged model in a child process first; the other ONNX tests use that export.
"""

import grpc
import pytest
from rpc_errors import error_info

from ragmesh.embed.v1 import embed_pb2_grpc
from services.embed.app import start
from services.embed.model import load_model
from services.embed.onnx_backend import OnnxBackend
from services.embed.provision import folder_for
from services.embed.settings import EmbedSettings


@pytest.fixture(scope="session")
def st_model():
    """The model on torch: the reference the ONNX vectors are held to."""
    return load_model("all-MiniLM-L6-v2", "cpu")


@pytest.fixture(scope="session")
def embed_settings(tmp_path_factory):
    return EmbedSettings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path_factory.mktemp("embed"),
        max_texts_per_request=64,
        max_chars_per_text=5_000,
        max_batch_size=32,
        max_wait_ms=20,
        models_dir=tmp_path_factory.mktemp("models"),
    )


@pytest.fixture(scope="session")
async def embed_app(embed_settings):
    """The service as configured by default: the ONNX backend, exported at first start."""
    app = await start(embed_settings)
    yield app
    await app.server.stop(0)
    await app.close()


@pytest.fixture(scope="session")
def onnx_folder(embed_app, embed_settings):
    """The export the service made when it first started."""
    return folder_for(embed_settings.model, embed_settings.resolved_models_dir)


@pytest.fixture(scope="session")
def onnx_backend(onnx_folder):
    return OnnxBackend(onnx_folder, "fp32", threads=1)


@pytest.fixture(scope="session")
async def embed_channel(embed_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{embed_app.server.port}") as channel:
        yield channel


@pytest.fixture
def embed_stub(embed_channel):
    return embed_pb2_grpc.EmbedServiceStub(embed_channel)


@pytest.fixture
def reason_of():
    return lambda exc: error_info(exc).reason
