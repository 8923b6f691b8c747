"""The ONNX backend: its export, agreement with torch, tokenization, and no torch at all."""

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.clients import wait_until_serving
from services.embed.app import start
from services.embed.model import Kind, resolve_model
from services.embed.onnx_backend import CONFIG_NAME, OnnxBackend, sub_batches
from services.embed.provision import is_current
from services.embed.settings import EmbedSettings
from services.embed.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[2]
WORDS = "data model server vector query document search index token batch chunk".split()
TEXTS = [
    "Hello",
    "The cat sat on the mat.",
    "  leading and trailing spaces  ",
    "Ünïcödé façade, naïve café; 北京大学; emoji 😀👍🏽; tabs\tand\nnew lines",
    "don't stop-words: e-mail, U.S.A., 3.14159, C++ and x86_64!",
    *(" ".join(WORDS[(i * j) % len(WORDS)] for j in range(40 * i)) for i in (3, 7)),  # > 256
]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def test_onnx_vectors_and_token_counts_are_those_of_torch(onnx_backend, st_model):
    vectors, counts = onnx_backend.encode(TEXTS)
    # Short and truncated texts run in separate sub-batches, out of input order.
    assert len(sub_batches(counts)) > 1
    expected, expected_counts = TorchBackend(st_model).encode(TEXTS)
    assert min_cosine(vectors, expected) >= 0.99999
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert counts == expected_counts
    assert max(counts) == 256  # the long texts were truncated to the model's window


def test_int8_is_a_different_graph_close_to_fp32(onnx_folder, st_model):
    vectors, _ = OnnxBackend(onnx_folder, "int8", threads=1).encode(TEXTS)
    expected = st_model.encode(TEXTS)
    assert 0.95 <= min_cosine(vectors, expected) < 0.99999


def test_tokenize_gives_the_spans_of_the_transformers_tokenizer(onnx_backend, st_model):
    texts = [*TEXTS, "x" * 3000, " ".join(WORDS * 100)]
    spans = onnx_backend.token_spans(texts)
    assert spans == TorchBackend(st_model).token_spans(texts)
    assert spans[-2][-1][1] == 3000  # never truncated


def test_the_export_holds_what_serving_needs(onnx_folder):
    config = json.loads((onnx_folder / CONFIG_NAME).read_text())
    assert config["dimension"] == 384
    assert config["max_seq_length"] == 256
    assert config["normalize"] is True
    assert config["source"] == resolve_model("all-MiniLM-L6-v2")
    assert config["min_cosine_to_torch"]["fp32"] >= 0.99999
    names = {path.name for path in onnx_folder.iterdir()}
    assert names == {CONFIG_NAME, "tokenizer.json", "model.onnx", "model.int8.onnx"}
    # Nothing half-written is left beside it.
    assert [p.name for p in onnx_folder.parent.iterdir()] == [onnx_folder.name]
    assert is_current(onnx_folder, "all-MiniLM-L6-v2")


def test_provisioning_again_keeps_the_export(onnx_folder, embed_settings):
    before = {path.name: path.stat().st_mtime_ns for path in onnx_folder.iterdir()}
    done = subprocess.run(
        [sys.executable, "-m", "services.embed.provision"],
        cwd=ROOT,
        env={**os.environ, "RAGMESH_EMBED_MODELS_DIR": str(embed_settings.resolved_models_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == str(onnx_folder)
    assert "already exported" in done.stderr
    assert {path.name: path.stat().st_mtime_ns for path in onnx_folder.iterdir()} == before


def test_a_stale_or_incomplete_export_is_not_current(onnx_folder, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in onnx_folder.iterdir():
        (copy / path.name).symlink_to(path)
    assert is_current(copy, "all-MiniLM-L6-v2")
    # Another source (or the same one changed since) has another fingerprint.
    assert not is_current(copy, str(Path(resolve_model("all-MiniLM-L6-v2")).parent))
    (copy / "model.int8.onnx").unlink()
    assert not is_current(copy, "all-MiniLM-L6-v2")
    config = json.loads((onnx_folder / CONFIG_NAME).read_text())
    (copy / CONFIG_NAME).unlink()
    (copy / CONFIG_NAME).write_text(json.dumps({**config, "fingerprint": "elsewhere"}))
    (copy / "model.int8.onnx").symlink_to(onnx_folder / "model.int8.onnx")
    assert not is_current(copy, "all-MiniLM-L6-v2")


async def test_the_embed_process_on_onnx_never_loads_torch(embed_settings, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "RAGMESH_EMBED_PORT": str(port),
        "RAGMESH_EMBED_DATA_DIR": str(tmp_path),
        "RAGMESH_EMBED_MODELS_DIR": str(embed_settings.resolved_models_dir),
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.embed"), cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        target = f"127.0.0.1:{port}"
        await wait_until_serving(target, 120)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            reply = await stub.Embed(embed_pb2.EmbedRequest(texts=TEXTS, normalize=True))
            spans = await stub.Tokenize(embed_pb2.TokenizeRequest(texts=TEXTS))
        maps = await asyncio.to_thread(Path(f"/proc/{process.pid}/maps").read_text)
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert len(reply.embeddings) == len(TEXTS)
    assert len(spans.texts) == len(TEXTS)
    assert "onnxruntime" in maps
    assert "/torch/" not in maps and "libtorch" not in maps
    assert b"OnnxBackend" in err  # the start logs which backend serves


def cls_pooling_model(folder: Path) -> Path:
    """The packaged model's weights with CLS pooling: a pipeline the export refuses."""
    source = Path(resolve_model("all-MiniLM-L6-v2"))
    folder.mkdir()
    for path in source.iterdir():
        if path.name != "1_Pooling":
            (folder / path.name).symlink_to(path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 384, "pooling_mode_cls_token": True})
    )
    return folder


async def test_a_model_the_export_refuses_is_served_on_torch_unless_onnx_is_asked(tmp_path):
    model = str(cls_pooling_model(tmp_path / "cls-model"))
    settings = {"host": "127.0.0.1", "port": 0, "data_dir": tmp_path, "model": model}
    with pytest.raises(ValueError, match=r"pooling 'cls'.*RAGMESH_EMBED_BACKEND=torch"):
        await start(EmbedSettings(**settings, backend="onnx"))
    # Only the verdict is kept, so the next start need not load the model to learn it.
    (folder,) = (tmp_path / "models").iterdir()
    assert [path.name for path in folder.iterdir()] == ["unsupported.json"]
    verdict = folder / "unsupported.json"
    written = verdict.stat()
    app = await start(EmbedSettings(**settings))  # auto
    try:
        result = await app.embedder.embed(TEXTS[:3], Kind.DOCUMENT, normalize=True)
    finally:
        await app.server.stop(0)
        await app.close()
    expected = SentenceTransformer(model, device="cpu").encode(TEXTS[:3])
    np.testing.assert_allclose(result.vectors, expected, atol=1e-5)
    assert (verdict.stat().st_ino, verdict.stat().st_mtime_ns) == (
        written.st_ino,
        written.st_mtime_ns,
    )


def test_onnx_settings_are_refused_where_onnx_does_not_run():
    with pytest.raises(ValidationError, match="CPU only"):
        EmbedSettings(backend="onnx", device="cuda")
    with pytest.raises(ValidationError, match="onnx_precision int8"):
        EmbedSettings(backend="torch", onnx_precision="int8")
    with pytest.raises(ValidationError, match="onnx_precision int8"):
        EmbedSettings(device="cuda", onnx_precision="int8")  # auto picks torch there
