"""Bounded downloads from the Hugging Face Hub.

Only the files a model needs are fetched, and only when their total size is within
RAGMESH_LLM_HUB_MAX_DOWNLOAD_BYTES. The fetch runs in a child process (a thread cannot
be stopped, a process can), which is killed when RAGMESH_LLM_HUB_DOWNLOAD_TIMEOUT_SECONDS
pass or the load is cancelled. `python -m services.llm.hub '<json>'` is that child: it
lists the repo, chooses and checks the files, downloads them into the cache and prints
the snapshot folder as one JSON line.
"""

import asyncio
import glob
import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.errors import FailedPrecondition, NotFound, ServiceError
from services.llm.engine import error_text
from services.llm.settings import env_name

_LOGGER = logging.getLogger(__name__)

# What transformers reads beside the weights: configs, tokenizers, chat templates.
_SUPPORT_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
# The weights transformers loads from a folder, sharded or not.
_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_PYTORCH_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")


class HubError(Exception):
    """The download failed; the message is the reason shown in the model status."""


@dataclass(frozen=True)
class Fetch:
    """What the child process fetches."""

    repo: str
    revision: str
    gguf_file: str
    remote_code: bool
    max_bytes: int
    cache_dir: str
    # Seconds the Hub may take to answer one request.
    request_timeout: float


def choose_files(
    files: Iterable[tuple[str, int | None]], *, gguf_file: str, remote_code: bool, max_bytes: int
) -> list[str]:
    """The files of a repo listing (name, size) a model load needs, within max_bytes.

    The weights are the GGUF file when one is named, else the top-level model*.safetensors
    (or, without those, pytorch_model*.bin); beside them the top-level configs, tokenizer
    files and chat templates, and the model's Python code only when it may run.
    """
    sizes = dict(files)
    top = [name for name in sizes if "/" not in name]
    if gguf_file:
        if gguf_file not in sizes:
            raise NotFound(f"the repo has no file {gguf_file}", reason="MODEL_NOT_FOUND")
        weights = [gguf_file]
    else:
        weights = [n for n in top if _SAFETENSORS.fullmatch(n)] or [
            n for n in top if _PYTORCH_BIN.fullmatch(n)
        ]
        if not weights:
            raise FailedPrecondition(
                "the repo has no model*.safetensors or pytorch_model*.bin weights; "
                "for a GGUF repo name the file in options.gguf_file",
                reason="NO_LOADABLE_WEIGHTS",
            )
    suffixes = _SUPPORT_SUFFIXES + ((".py",) if remote_code else ())
    chosen = sorted({*weights, *(n for n in top if n.endswith(suffixes))})
    unknown = [name for name in chosen if sizes[name] is None]
    if unknown:
        raise FailedPrecondition(
            f"the Hub did not report the size of {', '.join(unknown)}; refusing an "
            f"unbounded download ({env_name('hub_max_download_bytes')})",
            reason="DOWNLOAD_SIZE_UNKNOWN",
            metadata={"setting": env_name("hub_max_download_bytes")},
        )
    total = sum(sizes[name] for name in chosen)
    if total > max_bytes:
        raise FailedPrecondition(
            f"the model's {len(chosen)} files total {total:,} bytes, over the "
            f"{max_bytes:,} allowed by {env_name('hub_max_download_bytes')}",
            reason="DOWNLOAD_TOO_LARGE",
            metadata={
                "setting": env_name("hub_max_download_bytes"),
                "size_bytes": str(total),
                "limit_bytes": str(max_bytes),
            },
        )
    return chosen


async def download(fetch: Fetch, time_limit: float) -> Path:
    """Runs the child; the snapshot folder, or HubError. The child never outlives this call."""
    seconds = str(math.ceil(fetch.request_timeout))
    env = {
        **os.environ,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": seconds,
        "HF_HUB_DOWNLOAD_TIMEOUT": seconds,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        json.dumps(asdict(fetch)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), time_limit)
    except TimeoutError:
        raise HubError(
            f"the download of {fetch.repo} did not finish within {time_limit:g} s "
            f"({env_name('hub_download_timeout_seconds')}) and was stopped"
        ) from None
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    answer = _last_json_line(out)
    if "path" in answer:
        return Path(answer["path"])
    if err.strip():
        _LOGGER.warning("download of %s: %s", fetch.repo, err.decode(errors="replace")[-2000:])
    raise HubError(
        answer.get("error")
        or f"the download of {fetch.repo} failed (exit {child.returncode}); see the log"
    )


def _last_json_line(out: bytes) -> dict:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


# -- the child process -------------------------------------------------------------------


def fetch_files(fetch: Fetch) -> str:
    """Lists the repo, checks what a load needs, downloads it; the snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    revision = fetch.revision or None
    try:
        info = HfApi().model_info(
            fetch.repo, revision=revision, files_metadata=True, timeout=fetch.request_timeout
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise HubError(
            f"{fetch.repo} (revision {fetch.revision or 'main'}) is not on the Hub or not "
            "readable with the configured HF_TOKEN"
        ) from exc
    except Exception as exc:
        # Offline (HF_HUB_OFFLINE), unreachable or down: a copy in the cache will do.
        return _cached_snapshot(fetch, exc)
    try:
        chosen = choose_files(
            [(sibling.rfilename, sibling.size) for sibling in info.siblings or []],
            gguf_file=fetch.gguf_file,
            remote_code=fetch.remote_code,
            max_bytes=fetch.max_bytes,
        )
    except ServiceError as exc:
        raise HubError(f"{fetch.repo}: {exc.message}") from exc
    return snapshot_download(
        fetch.repo,
        revision=revision,
        allow_patterns=[glob.escape(name) for name in chosen],
        cache_dir=fetch.cache_dir,
    )


def _cached_snapshot(fetch: Fetch, error: Exception) -> str:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    wanted = fetch.revision or "main"
    try:
        repos = scan_cache_dir(fetch.cache_dir).repos
    except CacheNotFound:
        repos = frozenset()
    for repo in repos:
        if repo.repo_id != fetch.repo or repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if wanted in revision.refs or revision.commit_hash.startswith(wanted):
                return str(revision.snapshot_path)
    raise HubError(
        f"the Hugging Face Hub cannot be reached ({error_text(error)}) and {fetch.repo} "
        f"(revision {wanted}) is not in the cache"
    ) from error


def main() -> None:
    fetch = Fetch(**json.loads(sys.argv[1]))
    try:
        answer = {"path": fetch_files(fetch)}
    except HubError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        answer = {"error": f"the download of {fetch.repo} failed: {error_text(exc)}"}
    print(json.dumps(answer), flush=True)
    sys.exit(0 if "path" in answer else 1)


if __name__ == "__main__":
    main()
