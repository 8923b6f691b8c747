"""gRPC servicer of ragmesh.llm.v1.LlmService: validation and protobuf mapping, nothing more."""

import asyncio
import logging
import time

from google.protobuf import duration_pb2, timestamp_pb2

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.auth import require_scope
from services.common.context import ADMIN_SCOPE, current_principal
from services.common.errors import InvalidArgument
from services.llm.catalogue import ModelEntry, list_models
from services.llm.engine import Delta, FinishReason, Message, Result
from services.llm.genconfig import FIELD_NAMES, GenerationConfigStore, GenerationParams
from services.llm.loading import LoadOptions
from services.llm.manager import ModelManager, Passage, State, Status
from services.llm.settings import LlmSettings

_LOGGER = logging.getLogger(__name__)

_STATES = {state: llm_pb2.ModelState.Value(f"MODEL_STATE_{state.name}") for state in State}
_FINISH = {
    reason: llm_pb2.FinishReason.Value(f"FINISH_REASON_{reason.name}") for reason in FinishReason
}
_SOURCES = {
    "local": llm_pb2.MODEL_SOURCE_LOCAL,
    "hf_cache": llm_pb2.MODEL_SOURCE_HF_CACHE,
    "package": llm_pb2.MODEL_SOURCE_PACKAGE,
    "remote": llm_pb2.MODEL_SOURCE_REMOTE,
}
_FORMATS = {
    "safetensors": llm_pb2.MODEL_FORMAT_SAFETENSORS,
    "pytorch_bin": llm_pb2.MODEL_FORMAT_PYTORCH_BIN,
    "gguf": llm_pb2.MODEL_FORMAT_GGUF,
}
_QUANT_TO_PB = {
    "none": llm_pb2.QUANTIZATION_UNSPECIFIED,
    "int8": llm_pb2.QUANTIZATION_INT8,
    "nf4": llm_pb2.QUANTIZATION_NF4,
}
_QUANT_FROM_PB = {v: k for k, v in _QUANT_TO_PB.items()}
_BACKEND_FROM_PB = {
    llm_pb2.BACKEND_UNSPECIFIED: "auto",
    llm_pb2.BACKEND_TRANSFORMERS: "transformers",
    llm_pb2.BACKEND_OPENAI_COMPATIBLE: "openai",
    llm_pb2.BACKEND_LLAMA_CPP: "llama_cpp",
}
_BACKEND_TO_PB = {name: value for value, name in _BACKEND_FROM_PB.items()}
_ROLES = {
    llm_pb2.ROLE_SYSTEM: "system",
    llm_pb2.ROLE_USER: "user",
    llm_pb2.ROLE_ASSISTANT: "assistant",
}
_OVERRIDABLE = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")


def entry_to_pb(entry: ModelEntry) -> llm_pb2.ModelInfo:
    return llm_pb2.ModelInfo(
        id=entry.id,
        source=_SOURCES[entry.source],
        path=entry.path,
        format=_FORMATS.get(entry.format, llm_pb2.MODEL_FORMAT_UNSPECIFIED),
        size_bytes=entry.size_bytes,
        architecture=entry.architecture,
        loaded=entry.loaded,
        revision=entry.revision,
    )


def options_from_pb(pb: llm_pb2.LoadOptions) -> LoadOptions:
    if pb.quantization not in _QUANT_FROM_PB:
        raise InvalidArgument("unknown quantization", field="options.quantization")
    if pb.backend not in _BACKEND_FROM_PB:
        raise InvalidArgument("unknown backend", field="options.backend")
    return LoadOptions(
        model=pb.model.strip(),
        revision=pb.revision,
        device=pb.device.strip().lower() or "auto",
        dtype=pb.dtype.strip().lower() or "auto",
        quantization=_QUANT_FROM_PB[pb.quantization],
        trust_remote_code=pb.trust_remote_code,
        backend=_BACKEND_FROM_PB[pb.backend],
        base_url=pb.base_url.strip(),
        gguf_file=pb.gguf_file.strip(),
    )


def options_to_pb(options: LoadOptions) -> llm_pb2.LoadOptions:
    return llm_pb2.LoadOptions(
        model=options.model,
        revision=options.revision,
        device=options.device,
        dtype=options.dtype,
        quantization=_QUANT_TO_PB[options.quantization],
        trust_remote_code=options.trust_remote_code,
        backend=_BACKEND_TO_PB[options.backend],
        base_url=options.base_url,
        gguf_file=options.gguf_file,
    )


def params_to_pb(params: GenerationParams) -> llm_pb2.GenerationConfig:
    return llm_pb2.GenerationConfig(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        stop_sequences=list(params.stop_sequences),
        seed=params.seed,
        revision=params.revision,
    )


def config_changes_from_pb(pb: llm_pb2.GenerationConfig, paths: list[str]) -> dict:
    """The fields to change: those named in the mask, or every set field without a mask."""
    values = {name: getattr(pb, name) for name in FIELD_NAMES if name != "seed"}
    values["stop_sequences"] = tuple(pb.stop_sequences)
    values["seed"] = pb.seed if pb.HasField("seed") else None
    if not paths:
        return {name: value for name, value in values.items() if value}
    unknown = [p for p in paths if p not in FIELD_NAMES and p != "revision"]
    if unknown:
        raise InvalidArgument(
            f"unknown field(s) in update_mask: {', '.join(unknown)}",
            field_violations=[
                ("update_mask", f"{p} is not a GenerationConfig field") for p in unknown
            ],
        )
    return {p: values[p] for p in paths if p != "revision"}


def overrides_from_pb(pb: llm_pb2.GenerationOverrides) -> dict:
    overrides = {name: getattr(pb, name) for name in _OVERRIDABLE if pb.HasField(name)}
    if pb.stop_sequences:
        overrides["stop_sequences"] = tuple(pb.stop_sequences)
    return overrides


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def status_to_pb(status: Status) -> llm_pb2.ModelStatus:
    update_time = timestamp_pb2.Timestamp()
    update_time.FromDatetime(status.update_time)
    return llm_pb2.ModelStatus(
        state=_STATES[status.state],
        model=status.model,
        options=options_to_pb(status.options) if status.options else None,
        error=status.error,
        progress=status.progress,
        load_duration=_duration(status.load_seconds),
        parameter_count=status.parameter_count,
        memory_bytes=status.memory_bytes,
        context_length=status.context_length,
        generation_config=params_to_pb(status.generation_config),
        serving_model=status.serving_model,
        device=status.device,
        update_time=update_time,
    )


def completion_to_pb(result: Result, dropped: int = 0) -> llm_pb2.Completion:
    return llm_pb2.Completion(
        finish_reason=_FINISH[result.finish_reason],
        usage=llm_pb2.Usage(
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
        ),
        timings=llm_pb2.Timings(
            queue=_duration(result.queue_seconds),
            time_to_first_token=_duration(result.time_to_first_token_seconds),
            total=_duration(result.total_seconds),
            tokens_per_second=result.tokens_per_second,
        ),
        text=result.text,
        dropped_messages=dropped,
        model=result.model,
    )


def messages_from_pb(messages) -> list[Message]:
    converted = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(
                "role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                field=f"messages[{i}].role",
            )
        converted.append(Message(role, message.content))
    return converted


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(
        self, settings: LlmSettings, manager: ModelManager, config: GenerationConfigStore
    ) -> None:
        self._settings = settings
        self._manager = manager
        self._config = config

    async def ListModels(self, request, context):
        entries = await asyncio.to_thread(list_models, self._settings.resolved_models_dir)
        status = self._manager.status()
        serving = status.serving_model
        models = []
        found = False
        for entry in entries:
            loaded = bool(serving) and entry.id == serving
            found = found or loaded
            models.append(entry_to_pb(entry))
            models[-1].loaded = loaded
        if serving and not found:
            options = status.options
            remote = options is not None and options.backend == "openai"
            models.append(
                llm_pb2.ModelInfo(
                    id=serving,
                    source=llm_pb2.MODEL_SOURCE_REMOTE if remote else llm_pb2.MODEL_SOURCE_LOCAL,
                    loaded=True,
                )
            )
        return llm_pb2.ListModelsResponse(models=models)

    async def LoadModel(self, request, context):
        require_scope(ADMIN_SCOPE)
        status = await self._manager.load(options_from_pb(request.options))
        return llm_pb2.LoadModelResponse(status=status_to_pb(status))

    async def UnloadModel(self, request, context):
        require_scope(ADMIN_SCOPE)
        status = await self._manager.unload()
        return llm_pb2.UnloadModelResponse(status=status_to_pb(status))

    async def GetModelStatus(self, request, context):
        return llm_pb2.GetModelStatusResponse(status=status_to_pb(self._manager.status()))

    async def WatchModelStatus(self, request, context):
        async for status in self._manager.watch():
            yield llm_pb2.WatchModelStatusResponse(status=status_to_pb(status))

    async def GetGenerationConfig(self, request, context):
        return llm_pb2.GetGenerationConfigResponse(config=params_to_pb(self._config.get()))

    async def UpdateGenerationConfig(self, request, context):
        require_scope(ADMIN_SCOPE)
        changes = config_changes_from_pb(request.config, list(request.update_mask.paths))
        applied = self._config.update(changes, self._manager.context_length)
        return llm_pb2.UpdateGenerationConfigResponse(config=params_to_pb(applied))

    async def CountTokens(self, request, context):
        which = request.WhichOneof("input")
        if which == "prompt":
            count, window = self._manager.count_prompt(request.prompt)
        elif which == "messages":
            count, window = self._manager.count_chat(messages_from_pb(request.messages.messages))
        else:
            raise InvalidArgument("set prompt or messages", field="input")
        return llm_pb2.CountTokensResponse(token_count=count, context_length=window)

    async def Generate(self, request, context):
        job, events = await self._manager.generate(
            request.prompt,
            overrides_from_pb(request.overrides),
            request.request_id,
            _owner(),
            _deadline(context),
        )
        async for event in events:
            if isinstance(event, Delta):
                yield llm_pb2.GenerateResponse(delta=event.text, request_id=job.request_id)
            else:
                yield llm_pb2.GenerateResponse(
                    completion=completion_to_pb(event), request_id=job.request_id
                )

    async def Chat(self, request, context):
        passages = [Passage(p.id, p.text, p.source) for p in request.context]
        for i, passage in enumerate(passages):
            if not passage.id or not passage.text:
                raise InvalidArgument("a passage needs an id and text", field=f"context[{i}]")
        job, dropped, events = await self._manager.chat(
            messages_from_pb(request.messages),
            request.system_prompt,
            passages,
            overrides_from_pb(request.overrides),
            request.request_id,
            _owner(),
            _deadline(context),
        )
        async for event in events:
            if isinstance(event, Delta):
                yield llm_pb2.ChatResponse(delta=event.text, request_id=job.request_id)
            else:
                yield llm_pb2.ChatResponse(
                    completion=completion_to_pb(event, dropped), request_id=job.request_id
                )

    async def Cancel(self, request, context):
        if not request.request_id:
            raise InvalidArgument("request_id is required", field="request_id")
        self._manager.cancel(request.request_id, _owner())
        return llm_pb2.CancelResponse()


def _deadline(context) -> float | None:
    """The call's deadline on time.monotonic()'s clock; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _owner() -> tuple[str, str]:
    """The caller a request belongs to: only it may cancel the request."""
    principal = current_principal()
    return principal.tenant, principal.subject
