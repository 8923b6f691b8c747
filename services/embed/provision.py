"""Exports a sentence-transformers model to ONNX, once, for the onnxruntime backend.

`python -m services.embed.provision` writes `<models_dir>/<name>-onnx/`: model.onnx (fp32,
fused by onnxruntime's BERT optimizer), model.int8.onnx (dynamic int8), tokenizer.json
and embed_onnx.json (dimension, max_seq_length, prompts, normalisation, the source's
fingerprint and how closely the export agrees with torch); for a model it cannot export,
only unsupported.json, saying why. It needs torch and sentence-transformers; serving the
folder needs neither. Run again, it does nothing while the source's files are unchanged.
The embed service runs it in a child process at first start, so the serving process
never imports torch.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from services.embed.model import resolve_model
from services.embed.onnx_backend import CONFIG_NAME, MODEL_FILES, TOKENIZER_NAME, OnnxBackend

_LOGGER = logging.getLogger(__name__)

# Bumped when the folder's layout or the export changes, so older folders are redone.
EXPORT_FORMAT = 1
# The fp32 export must give torch's vectors to this cosine, or it is not used.
MIN_COSINE = 0.99999
# Kept in place of an export when the model cannot be exported.
REFUSAL_NAME = "unsupported.json"
# Exit status of the command for a model whose pipeline the ONNX backend cannot run.
UNSUPPORTED_EXIT = 3
OPSET = 17
_PROBES = [
    "Hello",
    "The cat sat on the mat.",
    "Quarterly revenue grew by 12 percent, driven by cloud subscriptions.",
    "Café naïve façade, 北京, emoji 😀, tabs\tand\nnew lines.",
    " ".join(f"word{i} token{i % 7}" for i in range(400)),  # past the model's window
]


class UnsupportedModel(ValueError):
    """The model's pipeline has a step the ONNX backend does not reproduce."""


def folder_for(model: str, models_dir: Path) -> Path:
    """Where the export of `model` (a name, a Hub ID or a folder) lives."""
    name = Path(model).name if Path(model).is_dir() else model.replace("/", "--")
    return models_dir / f"{name}-onnx"


def fingerprint(source: str) -> str:
    """Changes when the source folder's files do; a Hub ID stands for itself."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            relative = path.relative_to(folder).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _stored(folder: Path, name: str, model: str) -> dict | None:
    """The JSON file `name` in `folder` if it was written for `model` as it is now."""
    try:
        stored = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    current = stored.get("format") == EXPORT_FORMAT
    if current and stored.get("fingerprint") == fingerprint(resolve_model(model)):
        return stored
    return None


def is_current(folder: Path, model: str) -> bool:
    """Whether `folder` holds a complete export of `model` as it is now."""
    files = [TOKENIZER_NAME, *MODEL_FILES.values()]
    return _stored(folder, CONFIG_NAME, model) is not None and all(
        (folder / name).is_file() for name in files
    )


def refusal(folder: Path, model: str) -> str | None:
    """Why exporting `model`, as it is now, was refused before; None if it was not."""
    stored = _stored(folder, REFUSAL_NAME, model)
    return None if stored is None else stored["reason"]


def provision(model: str, models_dir: Path, force: bool = False) -> Path:
    """Exports `model` into its folder under `models_dir` unless a current export is there.

    A model the ONNX backend cannot run raises UnsupportedModel, and the verdict is kept
    in the folder, so later starts do not load the model again to learn the same.
    """
    target = folder_for(model, models_dir)
    if not force:
        if is_current(target, model):
            _LOGGER.info("%s already exported at %s", model, target)
            return target
        if reason := refusal(target, model):
            raise UnsupportedModel(reason)
    started = time.perf_counter()
    try:
        _install(target, lambda staging: _export(model, staging))
    except UnsupportedModel as exc:
        reason = f"cannot export {model!r} to ONNX: {exc}"
        verdict = {
            "format": EXPORT_FORMAT,
            "fingerprint": fingerprint(resolve_model(model)),
            "reason": reason,
        }
        _install(target, lambda staging: (staging / REFUSAL_NAME).write_text(json.dumps(verdict)))
        raise UnsupportedModel(reason) from exc
    _LOGGER.info("exported %s to %s in %.1f s", model, target, time.perf_counter() - started)
    return target


def _install(target: Path, write) -> None:
    """Has `write` fill a staging folder, then puts that folder in place of `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A dot folder, so a half-written export is never mistaken for a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        write(staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same export first.
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


async def provision_in_child(model: str, models_dir: Path) -> Path:
    """`provision` in a child process, so torch never enters this one."""
    folder = folder_for(model, models_dir)
    if is_current(folder, model):
        return folder
    if reason := refusal(folder, model):
        raise UnsupportedModel(reason)
    _LOGGER.info("exporting %s to ONNX in a child process, once (about 30 s)", model)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.embed.provision", "--model", model),
        *("--models-dir", str(models_dir)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await process.communicate()
    finally:
        if process.returncode is None:  # cancelled: the export is not wanted any more
            process.kill()
            await process.wait()
    # The child's last line says why it failed: its own message, or an exception's.
    lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
    if process.returncode == UNSUPPORTED_EXIT:
        raise UnsupportedModel(lines[-1])
    if process.returncode != 0:
        raise ValueError(f"exporting {model!r} to ONNX failed ({process.returncode}): {lines[-1]}")
    return folder


def _export(model: str, folder: Path) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from sentence_transformers import SentenceTransformer

    source = resolve_model(model)
    _LOGGER.info("exporting embedding model %s from %s", model, source)
    try:
        # Eager attention traces to plain matrix products, which the optimizer fuses.
        st_model = SentenceTransformer(
            source,
            device="cpu",
            local_files_only=Path(source).is_dir(),
            model_kwargs={"attn_implementation": "eager"},
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load embedding model {model!r} from {source}: {exc}") from exc
    normalize = _check_pipeline(st_model)
    encoder = st_model[0].auto_model.eval()
    tokenizer = st_model.tokenizer
    names = list(tokenizer.model_input_names)
    sample = tokenizer(_PROBES[:2], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "token_embeddings"]}
    raw = folder / "raw.onnx"
    with torch.inference_mode():
        torch.onnx.export(
            _keyword_forward(encoder, names),
            tuple(sample[name] for name in names),
            str(raw),
            input_names=names,
            output_names=["token_embeddings"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    config = encoder.config
    optimized = optimizer.optimize_model(
        str(raw),
        model_type="bert",
        num_heads=getattr(config, "num_attention_heads", 0),
        hidden_size=getattr(config, "hidden_size", 0),
    )
    optimized.save_model_to_file(str(folder / MODEL_FILES["fp32"]))
    raw.unlink()
    # Per-channel weights on a reduced range kept neighbours closest (min cosine 0.97
    # against 0.85 per tensor); the fused graph's outputs need their type given.
    quantize_dynamic(
        folder / MODEL_FILES["fp32"],
        folder / MODEL_FILES["int8"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
    )
    tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_NAME))
    settings = {
        "format": EXPORT_FORMAT,
        "source": source,
        "fingerprint": fingerprint(source),
        "dimension": st_model.get_embedding_dimension(),
        "max_seq_length": st_model.max_seq_length,
        "prompts": dict(st_model.prompts),
        "pooling": "mean",
        "normalize": normalize,
        "opset": OPSET,
    }
    # The config's presence makes the folder loadable; it is finished below.
    (folder / CONFIG_NAME).write_text(json.dumps(settings))
    expected = st_model.encode(_PROBES, normalize_embeddings=True, show_progress_bar=False)
    agreement = {}
    for precision in MODEL_FILES:
        vectors, _ = OnnxBackend(folder, precision).encode(_PROBES)
        if not normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        agreement[precision] = float((vectors * expected).sum(axis=1).min())
    if agreement["fp32"] < MIN_COSINE:
        raise UnsupportedModel(
            f"the ONNX export of {model!r} gives vectors at a cosine of {agreement['fp32']:.6f}"
            f" to torch's (at least {MIN_COSINE} is needed)"
        )
    settings["min_cosine_to_torch"] = agreement
    (folder / CONFIG_NAME).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def _check_pipeline(st_model) -> bool:
    """Refuses what the ONNX backend would compute differently; says whether it normalises."""
    steps = [type(module).__name__ for module in st_model]
    if steps not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedModel(f"pipeline {' -> '.join(steps)}: only Transformer -> mean Pooling")
    transformer, pooling = st_model[0], st_model[1]
    if pooling.pooling_mode not in ("mean", ("mean",)):
        raise UnsupportedModel(f"pooling {pooling.pooling_mode!r}: only mean pooling")
    if not pooling.include_prompt and any(st_model.prompts.values()):
        raise UnsupportedModel("pooling leaves prompt tokens out")
    if getattr(transformer, "do_lower_case", False):
        raise UnsupportedModel("the model lower-cases texts outside its tokenizer")
    if not getattr(transformer.tokenizer, "is_fast", False):
        raise UnsupportedModel("the model has no fast (tokenizers) tokenizer")
    return len(steps) == 3


def _keyword_forward(encoder, names: list[str]):
    """A module that calls the encoder with its inputs by name, giving token embeddings."""
    import torch

    class KeywordForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *inputs):
            return self.encoder(**dict(zip(names, inputs, strict=True))).last_hidden_state

    return KeywordForward()


def main() -> None:
    from services.embed.settings import EmbedSettings

    settings = EmbedSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=settings.model)
    parser.add_argument("--models-dir", type=Path, default=settings.resolved_models_dir)
    parser.add_argument("--force", action="store_true", help="export again even if current")
    args = parser.parse_args()
    # The quantizer logs every tensor at INFO: only this package's progress is shown.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _LOGGER.setLevel(logging.INFO)
    try:
        print(provision(args.model, args.models_dir, force=args.force))
    except UnsupportedModel as exc:
        print(exc, file=sys.stderr)
        sys.exit(UNSUPPORTED_EXIT)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
