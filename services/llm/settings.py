"""Settings of the llm service, from RAGMESH_LLM_* environment variables."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class LlmSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGMESH_LLM_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50053, ge=0, le=65535)
    # Local models folder; default <data_dir>/models.
    models_dir: Path | None = None
    # Further folders local paths may point into; models_dir is always allowed.
    model_roots: list[Path] = Field(default_factory=list)
    # Loaded at start (catalogue id, path or Hub id); empty starts with no model.
    default_model: str = "SmolLM2-135M-Instruct"
    # Convert the packaged SmolLM2 GGUF at start when the default model folder is missing.
    provision_default: bool = True
    # Most requests decoded together in one forward pass.
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # Requests waiting for a batch slot beyond which new ones get RESOURCE_EXHAUSTED.
    max_queue: int = Field(default=64, ge=0)
    # Upper bound on the context window, below the model's own when smaller; 0 keeps the model's.
    max_context_tokens: int = Field(default=0, ge=0)
    # Seconds a Hub download or an OpenAI-compatible server may take to answer at load.
    hub_timeout_seconds: float = Field(default=30.0, gt=0)
    remote_timeout_seconds: float = Field(default=10.0, gt=0)
    # Bearer token for the OpenAI-compatible server, when it wants one.
    remote_api_key: str = ""

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @property
    def resolved_model_roots(self) -> list[Path]:
        return [self.resolved_models_dir, *(root.resolve() for root in self.model_roots)]
