"""The exported model on onnxruntime and `tokenizers`: no torch in the serving process.

A folder written by `services.embed.provision` holds the graph (fp32 and int8), the
tokenizer and what the sentence-transformers pipeline did after the transformer: masked
mean pooling, then (for most models) normalisation to unit length.
"""

import json
from pathlib import Path

import numpy as np

CONFIG_NAME = "embed_onnx.json"
TOKENIZER_NAME = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


class OnnxBackend:
    device = "cpu"
    splits_by_default = False

    def __init__(self, folder: Path, precision: str = "fp32", threads: int = 0) -> None:
        """Loads `folder`; `threads` is onnxruntime's intra-op threads per run (0: one per core)."""
        import onnxruntime
        from tokenizers import Tokenizer

        config = json.loads((folder / CONFIG_NAME).read_text())
        self.precision = precision
        self.dimension = int(config["dimension"])
        self.max_tokens = int(config["max_seq_length"])
        self.prompts = dict(config["prompts"])
        self._normalize = bool(config["normalize"])
        # Two tokenizers, as truncation is a setting of the object and both run at once:
        # Embed truncates to the model's window, Tokenize never does.
        self._spans_tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_NAME))
        self._spans_tokenizer.no_padding()
        self._spans_tokenizer.no_truncation()
        self._tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_NAME))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_tokens)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads would spin for work and take cores from the other shards
        # and from the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            str(folder / MODEL_FILES[precision]), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [node.name for node in self._session.get_inputs()]

    def init_compute_thread(self) -> None:
        """Nothing per thread: the session's thread count was set when it was created."""

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Pooled vectors of `texts` and each text's token count after truncation.

        Texts are run in sub-batches of similar length, each padded to its own longest
        text, so a short query batched with long chunks is not padded to their length.
        """
        encodings = self._tokenizer.encode_batch(texts)
        counts = [len(encoding.ids) for encoding in encodings]
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for rows in sub_batches(counts):
            vectors[rows] = self._pooled([encodings[row] for row in rows])
        if self._normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, counts

    def _pooled(self, encodings) -> np.ndarray:
        """One forward pass, padded to the longest encoding; masked mean of its tokens."""
        lengths = [len(encoding.ids) for encoding in encodings]
        ids = np.zeros((len(encodings), max(lengths)), dtype=np.int64)
        type_ids = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, (encoding, length) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :length] = encoding.ids
            type_ids[row, :length] = encoding.type_ids
            mask[row, :length] = 1
        feeds = {"input_ids": ids, "token_type_ids": type_ids, "attention_mask": mask}
        (tokens,) = self._session.run(None, {name: feeds[name] for name in self._inputs})
        # The masked sum as one matrix product per row, without a weighted copy of tokens.
        weights = mask.astype(np.float32)
        summed = np.matmul(weights[:, None, :], tokens)[:, 0]
        return summed / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        encodings = self._spans_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(encoding.offsets) for encoding in encodings]


def sub_batches(counts: list[int]) -> list[list[int]]:
    """Rows grouped for forward passes: longest first, a new group where padding a text to
    its group's longest would more than double its tokens."""
    order = sorted(range(len(counts)), key=lambda row: -counts[row])
    groups = [[order[0]]]
    for row in order[1:]:
        if 2 * counts[row] < counts[groups[-1][0]]:
            groups.append([row])
        else:
            groups[-1].append(row)
    return groups
