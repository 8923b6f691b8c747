"""A sentence-transformers model on torch: for models that cannot be exported, and GPUs."""

import numpy as np


class TorchBackend:
    splits_by_default = True

    def __init__(self, model) -> None:
        """Serves a loaded SentenceTransformer."""
        self.model = model
        dimension = getattr(model, "get_embedding_dimension", None)
        self.dimension = (dimension or model.get_sentence_embedding_dimension)()
        self.max_tokens = model.max_seq_length
        self.device = str(model.device)
        self.prompts = dict(getattr(model, "prompts", None) or {})

    def init_compute_thread(self) -> None:
        """One torch thread per shard: measured faster than one pass using every core."""
        import torch

        torch.set_num_threads(1)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        import torch

        with torch.inference_mode():
            vectors = self.model.encode(
                texts,
                batch_size=len(texts),  # one forward pass: a batch's shard
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        lengths = self.model.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_length=True,
        )["length"]
        return np.asarray(vectors, dtype=np.float32), [int(n) for n in lengths]

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        encoded = self.model.tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no warning for texts longer than the model's window
        )
        return [list(map(tuple, offsets)) for offsets in encoded["offset_mapping"]]
