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
    # A Qdrant server for the vectors, for example http://qdrant:6333, shared by every
    # replica. Empty (the embedded default) keeps them in Qdrant Edge shards under
    # <data_dir>/ingest-vectors, which one process owns.
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    # Without qdrant_url on PostgreSQL, which several replicas may share: true gives this
    # replica its own Edge shard that catches up from the database (at start, and every
    # index_sync_seconds); false refuses to start. Ignored with qdrant_url.
    edge_catch_up: bool = False
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
    # Documents, and bytes of originals, one tenant may hold (0: no limit). An upload past
    # either is refused with RESOURCE_EXHAUSTED; deleting documents frees room, and a
    # duplicate upload counts nothing.
    max_documents_per_tenant: int = Field(default=0, ge=0)
    max_bytes_per_tenant: int = Field(default=0, ge=0)
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
    # Each file is parsed in a child process that is stopped after this many seconds, and
    # whose address space is capped to this many bytes (1 GiB parses a 40 MB web page);
    # either makes the document FAILED.
    parse_timeout_seconds: float = Field(default=300.0, gt=0)
    parse_memory_bytes: int = Field(default=1024**3, ge=256 * 1024**2)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "IngestSettings":
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be smaller than chunk_tokens")
        return self

    @model_validator(mode="after")
    def _replicas_share_vectors(self) -> "IngestSettings":
        shared = self.resolved_database_url.startswith("postgresql")
        if shared and not self.qdrant_url and not self.edge_catch_up:
            raise ValueError(
                "the database is PostgreSQL, which several ingest replicas may share, but "
                "RAGMESH_INGEST_QDRANT_URL is empty: an embedded Edge shard is one process's "
                "and would never see the other replicas' documents. Set QDRANT_URL to a "
                "Qdrant server the replicas share, or RAGMESH_INGEST_EDGE_CATCH_UP=true to "
                "give each replica its own shard (its own DATA_DIR) that catches up from "
                "the database"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'ingest.db'}"

    @property
    def vector_folder(self) -> Path:
        """The Edge shards' folder (beside sessions' <data_dir>/vectors when they share one)."""
        return self.data_dir / "ingest-vectors"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"
