"""Loads a transformers model and tokenizer for the local backend: device, dtype, quantization."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.llm.catalogue import ResolvedModel
from services.llm.engine import EngineInfo
from services.llm.local import LocalEngine
from services.llm.settings import LlmSettings, env_name, normalize_base_url

_LOGGER = logging.getLogger(__name__)

DEVICES_HELP = '"auto", "cpu", "cuda" or "cuda:N"'
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZATIONS = ("none", "int8", "nf4")
BACKENDS = ("transformers", "openai")


@dataclass(frozen=True)
class LoadOptions:
    model: str
    revision: str = ""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    trust_remote_code: bool = False
    backend: str = "transformers"
    base_url: str = ""
    gguf_file: str = ""


def resolve_device(device: str) -> str:
    """The concrete device for an option value; FAILED_PRECONDITION when CUDA is missing."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise InvalidArgument(f"device must be {DEVICES_HELP}", field="options.device")
        if not torch.cuda.is_available():
            raise FailedPrecondition(
                f"device {device} asked for but this node has no CUDA device",
                reason="CUDA_UNAVAILABLE",
            )
        if int(index) >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"device {device} asked for but this node has "
                f"{torch.cuda.device_count()} CUDA device(s)",
                reason="CUDA_UNAVAILABLE",
            )
        return f"cuda:{index}"
    raise InvalidArgument(f"device must be {DEVICES_HELP}", field="options.device")


def check_options(options: LoadOptions, settings: LlmSettings) -> str:
    """Validates what can be checked before loading; returns the resolved device."""
    if options.backend not in BACKENDS:
        raise InvalidArgument("unknown backend", field="options.backend")
    if options.dtype not in ("auto", *DTYPES):
        raise InvalidArgument(
            'dtype must be "auto", "float32", "bfloat16" or "float16"', field="options.dtype"
        )
    if options.trust_remote_code:
        check_remote_code(options.model, settings)
    if options.backend == "openai":
        if not options.base_url.startswith(("http://", "https://")):
            raise InvalidArgument(
                "base_url must be an http(s) URL for the OpenAI-compatible backend",
                field="options.base_url",
            )
        if normalize_base_url(options.base_url) not in settings.remote_base_urls:
            raise PermissionDenied(
                f"{options.base_url} is not an OpenAI-compatible server this service may "
                f"use; the operator lists those in {env_name('remote_base_urls')}",
                reason="BASE_URL_NOT_ALLOWED",
                metadata={"setting": env_name("remote_base_urls")},
            )
        return "remote"
    device = resolve_device(options.device)
    if options.quantization != "none":
        if not device.startswith("cuda"):
            raise FailedPrecondition(
                f"{options.quantization} quantization needs bitsandbytes on a CUDA device; "
                f"this load would run on {device}. Load without quantization or on a GPU node",
                reason="QUANTIZATION_NEEDS_CUDA",
            )
        if options.gguf_file or options.model.endswith(".gguf"):
            raise InvalidArgument(
                "a GGUF model is dequantized at load; it cannot also be quantized",
                field="options.quantization",
            )
    return device


def check_remote_code(model: str, settings: LlmSettings) -> None:
    """PERMISSION_DENIED, naming the setting, unless the operator lets model run its code."""
    if not settings.trust_remote_code:
        setting = env_name("trust_remote_code")
        raise PermissionDenied(
            f"trust_remote_code asked for, but this service runs no model code: the "
            f"operator allows it with {setting}",
            reason="REMOTE_CODE_NOT_ALLOWED",
            metadata={"setting": setting},
        )
    if settings.trust_remote_code_repos and model not in settings.trust_remote_code_repos:
        setting = env_name("trust_remote_code_repos")
        raise PermissionDenied(
            f"trust_remote_code asked for, but {model} is not among the models allowed to "
            f"run their code ({setting})",
            reason="REMOTE_CODE_NOT_ALLOWED",
            metadata={"setting": setting},
        )


def load_transformers(
    resolved: ResolvedModel,
    options: LoadOptions,
    device: str,
    *,
    max_batch: int,
    max_queue: int,
    max_context: int,
    hub_cache_path: Path | None = None,
) -> LocalEngine:
    """Loads from a local folder (hub_cache_path for a downloaded Hub repo). Blocking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(hub_cache_path or resolved.path)
    dtype = DTYPES.get(options.dtype)
    if dtype is None:
        # float32 is the fast path on CPU; GPUs take the half type they do best.
        dtype = torch.float32 if device == "cpu" else _gpu_half()
    kwargs = {
        "trust_remote_code": options.trust_remote_code,
        "local_files_only": True,
    }
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    model_kwargs = dict(kwargs, dtype=dtype, attn_implementation="sdpa")
    if options.quantization != "none":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if options.quantization == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        )
    if device != "cpu":
        model_kwargs["device_map"] = device
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    model.eval()
    context = _context_length(model, tokenizer)
    if max_context:
        context = min(context, max_context)
    info = EngineInfo(
        name=resolved.name,
        device=device,
        context_length=context,
        parameter_count=sum(p.numel() for p in model.parameters()),
    )
    _LOGGER.info(
        "loaded %s on %s (%s, %d parameters, context %d)",
        resolved.name,
        device,
        dtype,
        info.parameter_count,
        context,
    )
    return LocalEngine(model, tokenizer, info, max_batch=max_batch, max_queue=max_queue)


def _context_length(model, tokenizer) -> int:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048


def _gpu_half() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
