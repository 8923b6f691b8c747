"""In-process transformers backend on the shared batching loop (services/llm/batching.py).

A request's prompt is prefilled alone and its KV cache left-padded into the batch's; each
step then decodes one token of every running request in one forward pass, and a request
that leaves takes its row (and any all-padding columns) out of the cache.
"""

import gc

import psutil
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.common.errors import FailedPrecondition
from services.llm.batching import BatchingEngine, Request
from services.llm.engine import EngineInfo, Message


class _State:
    """A request's sampling state: its generator and every id seen (for the repetition penalty)."""

    def __init__(self, generator: torch.Generator, seen: torch.Tensor) -> None:
        self.generator = generator
        self.seen = seen
        self.cache: DynamicCache | None = None  # the prompt's cache until it joins


class TransformersEngine(BatchingEngine):
    """Runs a loaded causal LM; all model calls happen on its own decode thread."""

    def __init__(self, model, tokenizer, info: EngineInfo, max_batch: int, max_queue: int) -> None:
        super().__init__(tokenizer, _eos_ids(model, tokenizer), info, max_batch, max_queue)
        self.model = model
        # Batch state, touched only by the decode thread.
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._start_thread()

    def memory_bytes(self) -> int:
        if self.info.device.startswith("cuda"):
            return int(torch.cuda.memory_allocated(torch.device(self.info.device)))
        return psutil.Process().memory_info().rss

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise FailedPrecondition(
                f"{self.info.name} has no chat template (chat_template in its tokenizer "
                "config); use Generate with a prompt, or load an instruct model",
                reason="NO_CHAT_TEMPLATE",
            )
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    # -- hooks of the batching loop ----------------------------------------------------------

    def _thread_context(self):
        return torch.inference_mode()

    def _prefill(self, request: Request, count: int) -> int:
        """The whole prompt at once (no prefill budget): count is its length."""
        device = self.model.device
        ids = torch.tensor([request.job.prompt_ids], device=device)
        generator = torch.Generator(device=device).manual_seed(request.seed)
        request.state = state = _State(generator, ids[0])
        state.cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return self._sample(request, out.logits[:, -1], 0)

    def _join(self, request: Request) -> None:
        """Left-pads the batch's or the newcomer's KV cache so their lengths match, then stacks."""
        cache, request.state.cache = request.state.cache, None
        mask = torch.ones(
            (1, len(request.job.prompt_ids)), dtype=torch.long, device=self.model.device
        )
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])

    def _forward(self) -> torch.Tensor:
        device = self.model.device
        tokens = torch.tensor([[r.next_token] for r in self._active], device=device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones_like(tokens)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _sample(self, request: Request, out: torch.Tensor, row: int) -> int:
        state: _State = request.state
        params = request.job.params
        logits = out[row].float()
        if torch.isnan(logits).any():
            raise FloatingPointError("the model produced NaN logits")
        if params.repetition_penalty != 1.0:
            scores = logits[state.seen]
            scores = torch.where(
                scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty
            )
            logits = logits.scatter(0, state.seen, scores)
        if params.greedy:
            token = int(logits.argmax())
        else:
            token = _draw(logits, params, state.generator)
        state.seen = torch.cat([state.seen, state.seen.new_tensor([token])])
        return token

    def _drop(self, keep: list[int], gone: list[Request]) -> None:
        """Takes the rows that left out of the cache and trims all-padding columns."""
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _reset(self, running: list[Request]) -> None:
        self._cache = self._mask = None
        _free_memory()

    def _probe(self) -> None:
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        if torch.isnan(logits).any():
            raise FloatingPointError("the model produces NaN logits")

    def _out_of_memory(self, exc: Exception) -> bool:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            _free_memory()
            return True
        return False

    def _release(self) -> None:
        self.model = None
        self._cache = None
        _free_memory()


def _draw(logits: torch.Tensor, params, generator: torch.Generator) -> int:
    """Samples with temperature, then top-k, then top-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(dim=0)
        drop = probs.cumsum(dim=0) - probs > params.top_p
        logits = logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
