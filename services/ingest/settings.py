"""Settings of the ingest service, read from RAGMESH_INGEST_* environment variables."""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGMESH_INGEST_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50051, ge=0, le=65535)
    # Hybrid search: semantic_weight * semantic + (1 - semantic_weight) * keyword, each
    # score divided by its channel's top score ("ratio") or min-max normalised ("convex");
    # "rrf" is reciprocal rank fusion with rrf_k.
    fusion: Literal["ratio", "convex", "rrf"] = "ratio"
    semantic_weight: float = Field(default=0.7, ge=0, le=1)
    rrf_k: int = Field(default=60, ge=1)
    # Seconds between catching up with documents other replicas indexed or deleted.
    index_sync_seconds: float = Field(default=5.0, gt=0)
    # SQLAlchemy async URL; empty means SQLite at <data_dir>/ingest.db.
    # PostgreSQL: postgresql+asyncpg://user:password@host:5432/ragmesh
    database_url: str = ""
    # A Qdrant server for the vectors, for example http://qdrant:6333. Empty (the embedded
    # default) keeps vectors in the database and searches them exactly in memory.
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    # Where original uploads are kept; empty means <data_dir>/blobs.
    blob_dir: Path | None = None
    embed_target: str = "localhost:50052"
    # Sent as "Bearer <key>" to an embed service that checks credentials.
    embed_api_key: str = ""
    # Seconds for one call to the embed service.
    embed_timeout_seconds: float = Field(default=120.0, gt=0)
    # Texts per Embed call; the embed service gathers concurrent calls into batches.
    embed_batch_size: int = Field(default=32, ge=1, le=256)
    # Embed calls one document keeps in flight, so the model never waits on us.
    embed_concurrency: int = Field(default=2, ge=1, le=16)
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    # Chunk size and overlap in tokens of the embedding model; the size is capped to
    # what the model reads (its max tokens less the two special tokens).
    chunk_tokens: int = Field(default=256, ge=16)
    chunk_overlap_tokens: int = Field(default=32, ge=0)
    workers: int = Field(default=2, ge=1, le=64)
    # A job whose worker stops renewing its lease this long is taken over (crash).
    job_lease_seconds: float = Field(default=60.0, gt=0)
    # How often idle workers look for jobs queued by other replicas.
    job_poll_seconds: float = Field(default=1.0, gt=0)
    # Transient failures (embed service down) are retried this many times, with backoff.
    job_max_attempts: int = Field(default=5, ge=1)
    # Largest decompressed DOCX (sum of its parts); caps zip bombs before parsing.
    max_docx_uncompressed_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    # Largest parsed text kept for a document, in characters.
    max_text_chars: int = Field(default=20_000_000, ge=1)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "IngestSettings":
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be smaller than chunk_tokens")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'ingest.db'}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"
