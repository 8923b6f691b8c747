"""ragmesh models: the llm service's models, loading, status and generation settings."""

from enum import StrEnum
from typing import Annotated

import typer
from google.protobuf import descriptor, field_mask_pb2
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ragmesh.llm.v1 import llm_pb2
from services.cli.mesh import CliError
from services.cli.output import (
    JsonFlag,
    add_row,
    console,
    enum_name,
    fields,
    print_json,
    size,
    table,
    to_dict,
)

app = typer.Typer(
    help="Models: list, load, unload, status and generation settings (the llm service).",
)

# Every GenerationConfig field but the revision the service assigns is a setting.
SETTINGS = {
    name: field
    for name, field in llm_pb2.GenerationConfig.DESCRIPTOR.fields_by_name.items()
    if name != "revision"
}


def _choices(enum, prefix: str, unspecified: str) -> tuple[type[StrEnum], dict[str, int]]:
    """An option's choices from a proto enum, for example llama_cpp for BACKEND_LLAMA_CPP."""
    values = {
        name.removeprefix(prefix).lower() if value else unspecified: value
        for name, value in enum.items()
    }
    return StrEnum(prefix.title().replace("_", ""), [(name, name) for name in values]), values


# The service's own lists, so a backend it adds is a choice here too.
Quantization, QUANTIZATIONS = _choices(llm_pb2.Quantization, "QUANTIZATION_", "none")
Backend, BACKENDS = _choices(llm_pb2.Backend, "BACKEND_", "auto")
FLOATS = (descriptor.FieldDescriptor.CPPTYPE_DOUBLE, descriptor.FieldDescriptor.CPPTYPE_FLOAT)
DONE = (llm_pb2.MODEL_STATE_READY, llm_pb2.MODEL_STATE_FAILED)


def _state(status: llm_pb2.ModelStatus) -> str:
    return enum_name(llm_pb2.ModelState, status.state, "MODEL_STATE_")


@app.command("list")
def list_(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """List the models the llm service can load; the loaded one is marked."""
    mesh = ctx.obj
    stub = mesh.stub("llm")
    reply = stub.ListModels(llm_pb2.ListModelsRequest())
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    grid = table("", "MODEL", "SOURCE", "FORMAT", "SIZE", "ARCHITECTURE")
    for model in reply.models:
        add_row(
            grid,
            Text("●", style="green") if model.loaded else "",
            model.id,
            enum_name(llm_pb2.ModelSource, model.source, "MODEL_SOURCE_").lower(),
            enum_name(llm_pb2.ModelFormat, model.format, "MODEL_FORMAT_").lower(),
            size(model.size_bytes) if model.size_bytes else "",
            model.architecture,
        )
    console.print(grid)


def _status_rows(status: llm_pb2.ModelStatus) -> list[tuple[str, str]]:
    rows = [("state", _state(status)), ("model", status.model)]
    if status.serving_model and status.serving_model != status.model:
        rows.append(("serving", status.serving_model))
    if status.error:
        rows.append(("error", status.error))
    if status.device:
        rows.append(("device", status.device))
    if status.parameter_count:
        rows.append(("parameters", f"{status.parameter_count / 1e6:.0f} M"))
    if status.memory_bytes:
        rows.append(("memory", size(status.memory_bytes)))
    if status.context_length:
        rows.append(("context", f"{status.context_length} tokens"))
    if status.load_duration.seconds or status.load_duration.nanos:
        rows.append(("loaded in", f"{status.load_duration.ToTimedelta().total_seconds():.1f} s"))
    return rows


@app.command()
def status(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """Show the model's state, where it runs and the generation settings in force."""
    mesh = ctx.obj
    stub = mesh.stub("llm")
    reply = stub.GetModelStatus(llm_pb2.GetModelStatusRequest()).status
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    console.print(fields(_status_rows(reply)))
    console.print(Text("generation settings", style="bold"))
    console.print(_config(reply.generation_config))


@app.command()
def load(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="A model id from `ragmesh models list`, a path or a Hub id."
        ),
    ],
    revision: Annotated[str, typer.Option(help="Hub revision (branch, tag or commit).")] = "",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "",
    quantization: Annotated[
        Quantization,
        typer.Option(case_sensitive=False, help="Quantized weights (CUDA only)."),
    ] = "none",
    backend: Annotated[
        Backend,
        typer.Option(
            case_sensitive=False,
            help="auto chooses by the model's format; openai_compatible needs --base-url.",
        ),
    ] = "auto",
    base_url: Annotated[str, typer.Option(help="The OpenAI-compatible server.")] = "",
    gguf_file: Annotated[str, typer.Option(help="The .gguf file inside the folder or repo.")] = "",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the model's own code, where the operator allows it.")
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Load a model and follow the load until it serves; the current model keeps
    serving meanwhile, and after a failed load."""
    mesh = ctx.obj
    stub = mesh.stub("llm")
    options = llm_pb2.LoadOptions(
        model=model,
        revision=revision,
        device=device,
        dtype=dtype,
        quantization=QUANTIZATIONS[quantization],
        backend=BACKENDS[backend],
        base_url=base_url,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
    )
    # Watched from before the load, so no transition is missed.
    watch = stub.WatchModelStatus(llm_pb2.WatchModelStatusRequest())
    try:
        next(watch)
        current = stub.LoadModel(llm_pb2.LoadModelRequest(options=options)).status
        if json_ or mesh.json:
            while current.state not in DONE:
                current = next(watch).status
            print_json(to_dict(current))
        else:
            current = _follow(watch, current)
    finally:
        watch.cancel()
    if current.state == llm_pb2.MODEL_STATE_FAILED:
        raise CliError(f"loading {model} failed: {current.error}")
    if not (json_ or mesh.json):
        console.print(fields(_status_rows(current)))


def _follow(watch, current: llm_pb2.ModelStatus) -> llm_pb2.ModelStatus:
    """A progress bar over the load's transitions, until READY or FAILED."""
    with Progress(
        TextColumn("{task.fields[model]}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[state]}", markup=False),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("", total=1.0, model=current.model, state=_state(current))
        while current.state not in DONE:
            current = next(watch).status
            progress.update(task, completed=current.progress, state=_state(current), refresh=True)
    return current


@app.command()
def unload(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """Unload the model, freeing its CPU and GPU memory."""
    mesh = ctx.obj
    stub = mesh.stub("llm")
    reply = stub.UnloadModel(llm_pb2.UnloadModelRequest()).status
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    console.print(fields(_status_rows(reply)))


def _config(config: llm_pb2.GenerationConfig):
    rows = []
    for name, field in SETTINGS.items():
        value = getattr(config, name)
        if field.is_repeated:
            shown = ", ".join(repr(item) for item in value) or "(none)"
        elif field.has_presence and not config.HasField(name):
            shown = "(unset)"
        else:
            shown = f"{value:g}" if field.cpp_type in FLOATS else str(value)
        rows.append((name, shown))
    rows.append(("revision", str(config.revision)))
    return fields(rows)


def _parse_settings(assignments: list[str]) -> tuple[llm_pb2.GenerationConfig, list[str]]:
    """KEY=VALUE pairs into a config and its update mask; a repeated setting collects
    every value given (KEY= clears it)."""
    config, paths = llm_pb2.GenerationConfig(), []
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        field = SETTINGS.get(name.strip())
        if not sep or field is None:
            raise typer.BadParameter(
                f"{assignment!r} is not KEY=VALUE with KEY one of {', '.join(SETTINGS)}",
                param_hint="--set",
            )
        name, value = name.strip(), value.strip()
        if name not in paths:
            paths.append(name)
        if field.is_repeated:
            if value:
                getattr(config, name).append(value)
            continue
        number = float if field.cpp_type in FLOATS else int
        try:
            setattr(config, name, number(value))
        except ValueError as exc:
            kind = "a number" if number is float else "a whole number, 0 or more"
            raise typer.BadParameter(f"{name} must be {kind}", param_hint="--set") from exc
    return config, paths


@app.command()
def config(
    ctx: typer.Context,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help=f"Change a setting (repeatable): {', '.join(SETTINGS)}.",
        ),
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Show the generation settings, or change them with --set; a change prints the
    settings the service confirmed and their new revision."""
    mesh = ctx.obj
    update = _parse_settings(assignments) if assignments else None
    stub = mesh.stub("llm")
    if update is None:
        reply = stub.GetGenerationConfig(llm_pb2.GetGenerationConfigRequest()).config
    else:
        wanted, paths = update
        reply = stub.UpdateGenerationConfig(
            llm_pb2.UpdateGenerationConfigRequest(
                config=wanted, update_mask=field_mask_pb2.FieldMask(paths=paths)
            )
        ).config
    if json_ or mesh.json:
        print_json(to_dict(reply))
        return
    console.print(_config(reply))
    if update is not None:
        console.print(Text(f"applied: revision {reply.revision}", style="green"))
