"""Settings of the sessions service, read from RAGMESH_SESSIONS_* environment variables."""

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class SessionsSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGMESH_SESSIONS_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50054, ge=0, le=65535)
    # SQLAlchemy async URL; empty means SQLite at <data_dir>/sessions.db.
    # PostgreSQL: postgresql+asyncpg://user:password@host:5432/sessions
    database_url: str = ""
    # A Qdrant server for memory vectors, for example http://qdrant:6333. Empty (the
    # embedded default) keeps them in a Qdrant Edge shard under <data_dir>/vectors.
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    ingest_target: str = "localhost:50051"
    embed_target: str = "localhost:50052"
    # The llm service answering sessions with no model or a model not in llm_targets.
    llm_target: str = "localhost:50053"
    # Model id -> llm target, for meshes with one llm deployment per model. Empty means
    # one target (llm_target) whose loaded model serves every session.
    llm_targets: dict[str, str] = Field(default_factory=dict)
    # The service's own keys, sent in background work (memory indexing, tags) and on
    # every call to embed; a caller's calls forward the caller's credentials instead.
    ingest_api_key: str = ""
    embed_api_key: str = ""
    llm_api_key: str = ""
    # Seconds for one call to ingest or embed; a streaming answer gets llm_timeout_seconds.
    upstream_timeout_seconds: float = Field(default=30.0, gt=0)
    llm_timeout_seconds: float = Field(default=600.0, gt=0)
    # Document chunks and past exchanges recalled per message, unless the message says.
    document_top_k: int = Field(default=5, ge=0, le=50)
    memory_top_k: int = Field(default=3, ge=0, le=50)
    # Memories scoring below this cosine similarity are not recalled.
    memory_min_score: float = Field(default=0.3, ge=-1, le=1)
    # History considered for the prompt (newest first, whole messages, then budgeted
    # against the model's context with CountTokens).
    history_messages: int = Field(default=40, ge=0, le=1000)
    # Tokens kept free in the context for the answer when the request sets no
    # max_new_tokens of its own.
    answer_reserve_tokens: int = Field(default=256, ge=1)
    # Automatic tags kept per session.
    auto_tags: int = Field(default=5, ge=0, le=20)
    # Sessions whose names and tags SearchSessions matches by words (most recent first).
    search_name_scan: int = Field(default=5000, ge=1)

    @field_validator("llm_targets")
    @classmethod
    def _targets_named(cls, value: dict[str, str]) -> dict[str, str]:
        for model, target in value.items():
            if not model.strip() or not target.strip():
                raise ValueError("llm_targets maps non-empty model ids to host:port targets")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'sessions.db'}"
