"""Load options and their checks; loads a model on the transformers or the llama.cpp backend."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.llm.catalogue import ResolvedModel
from services.llm.engine import Engine, EngineInfo
from services.llm.settings import LlmSettings, env_name, normalize_base_url

# torch and transformers are imported by the transformers backend only: a GGUF served by
# llama.cpp leaves their few hundred MB out of the process.

_LOGGER = logging.getLogger(__name__)

DEVICES_HELP = '"auto", "cpu", "cuda" or "cuda:N"'
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "nf4")
# "auto" picks llama_cpp for a GGUF, transformers otherwise.
BACKENDS = ("auto", "transformers", "llama_cpp", "openai")


@dataclass(frozen=True)
class LoadOptions:
    model: str
    revision: str = ""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    trust_remote_code: bool = False
    backend: str = "auto"
    base_url: str = ""
    gguf_file: str = ""


def _parse_device(device: str) -> str:
    """ "auto", "cpu" or "cuda:N" for an option value; INVALID_ARGUMENT otherwise."""
    device = (device or "auto").strip().lower()
    if device in ("auto", "cpu"):
        return device
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if index.isdigit():
            return f"cuda:{index}"
    raise InvalidArgument(f"device must be {DEVICES_HELP}", field="options.device")


def resolve_device(device: str) -> str:
    """The concrete device for an option value; FAILED_PRECONDITION when CUDA is missing."""
    device = _parse_device(device)
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            f"device {device} asked for but this node has no CUDA device",
            reason="CUDA_UNAVAILABLE",
        )
    if int(device.partition(":")[2]) >= torch.cuda.device_count():
        raise FailedPrecondition(
            f"device {device} asked for but this node has "
            f"{torch.cuda.device_count()} CUDA device(s)",
            reason="CUDA_UNAVAILABLE",
        )
    return device


def resolve_llama_device(device: str) -> str:
    """The device of a GGUF on llama.cpp: as resolve_device when this llama-cpp-python
    build offloads to GPUs (a CUDA build); without that "auto" is the CPU and a CUDA
    device is refused."""
    from services.llm.llama_backend import gpu_offload

    if gpu_offload():
        return resolve_device(device)
    device = _parse_device(device)
    if device in ("auto", "cpu"):
        return "cpu"
    raise FailedPrecondition(
        f"device {device} asked for, but this llama-cpp-python build has no GPU offload; "
        'install one built with CMAKE_ARGS="-DGGML_CUDA=on" or load on the CPU',
        reason="CUDA_UNAVAILABLE",
    )


def check_options(
    options: LoadOptions, settings: LlmSettings, resolved: ResolvedModel | None
) -> tuple[LoadOptions, str]:
    """Validates what can be checked before loading (resolved is None for the OpenAI
    backend); returns the options with the backend chosen, and the resolved device."""
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
        return options, "remote"
    gguf = bool(resolved.gguf_file)
    backend = options.backend
    if backend == "auto":
        # A GGUF runs as shipped on llama.cpp; everything else on transformers.
        backend = "llama_cpp" if gguf else "transformers"
    if backend == "llama_cpp":
        if not gguf:
            raise InvalidArgument(
                "the llama.cpp backend loads .gguf files; name one (or options.gguf_file), "
                "or load this model with the transformers backend",
                field="options.backend",
            )
        if options.dtype != "auto":
            raise InvalidArgument(
                "dtype applies to the transformers backend; a GGUF runs in the types it "
                "was saved in",
                field="options.dtype",
            )
    if backend == "llama_cpp":
        device = resolve_llama_device(options.device)
    else:
        device = resolve_device(options.device)
    if options.quantization != "none":
        if gguf:
            raise InvalidArgument(
                "a GGUF model keeps its own quantization; bitsandbytes quantization is for "
                "safetensors models",
                field="options.quantization",
            )
        if not device.startswith("cuda"):
            raise FailedPrecondition(
                f"{options.quantization} quantization needs bitsandbytes on a CUDA device; "
                f"this load would run on {device}. Load without quantization or on a GPU node",
                reason="QUANTIZATION_NEEDS_CUDA",
            )
    return replace(options, backend=backend), device


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
) -> Engine:
    """Loads from a local folder (hub_cache_path for a downloaded Hub repo). Blocking."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.llm.local import TransformersEngine

    source = str(hub_cache_path or resolved.path)
    dtype = getattr(torch, options.dtype, None) if options.dtype != "auto" else None
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
    return TransformersEngine(model, tokenizer, info, max_batch=max_batch, max_queue=max_queue)


def _context_length(model, tokenizer) -> int:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048


def _gpu_half():
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_llama_cpp(
    resolved: ResolvedModel,
    options: LoadOptions,
    device: str,
    *,
    max_batch: int,
    max_queue: int,
    max_context: int,
    threads: int = 0,
    hub_cache_path: Path | None = None,
) -> Engine:
    """Loads a GGUF file as it is (hub_cache_path for a downloaded Hub repo), decoding with
    `threads` CPU threads (0: every CPU the process may use). Blocking."""
    import llama_cpp

    from services.llm.llama_backend import LlamaCppEngine, LlamaModel, cpu_count

    path = Path(hub_cache_path or resolved.path) / resolved.gguf_file
    max_batch = min(max_batch, llama_cpp.llama_max_parallel_sequences())
    model = LlamaModel(
        path, device, max_context=max_context, n_seq=max_batch, threads=threads or cpu_count()
    )
    context = model.context_length
    info = EngineInfo(
        name=resolved.name,
        device=device,
        context_length=context,
        parameter_count=llama_cpp.llama_model_n_params(model.model),
    )
    _LOGGER.info(
        "loaded %s on %s with llama.cpp (%d parameters, context %d, %d threads)",
        resolved.name,
        device,
        info.parameter_count,
        context,
        model.threads,
    )
    return LlamaCppEngine(model, info, max_batch=max_batch, max_queue=max_queue)
