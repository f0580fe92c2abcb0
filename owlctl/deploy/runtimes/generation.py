"""Text generation on a loaded causal LM (dense or with owlctl's sparse Linears): prefill once, then one token
per step through the KV cache, greedy or sampled; text is handed out piece by piece as it becomes final.

``TextPieces`` turns the growing list of generated ids into text increments. A token may end in the middle
of a UTF-8 character (byte-level tokenizers split multi-byte characters over several tokens) and some
tokenizers only know how to space a token once its neighbours are known, so it decodes a short window of
recent ids, compares it with the same window without the newest ids, and hands out only the difference
once it no longer ends in U+FFFD (an unfinished byte sequence). The pieces concatenate to the decoding of
all ids (``finish`` hands out what is still held back).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"


class TextPieces:
    """Incremental detokenizer: ``push(id)`` -> the new final text ('' while a character is unfinished)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window of ids decoded for context begins here
        self.done = 0  # ids up to here have been handed out as text
        self.emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.start:self.done])
        now = self._decode(self.ids[self.start:])
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""
        piece = now[len(before):]
        self.start, self.done = self.done, len(self.ids)
        self.emitted.append(piece)
        return piece

    def finish(self) -> str:
        """What is still held back, so that the pieces add up to the full decoding."""
        full = self._decode(self.ids)
        sent = "".join(self.emitted)
        rest = full[len(sent):] if full.startswith(sent) else ""
        if rest:
            self.emitted.append(rest)
        return rest

    @property
    def text(self) -> str:
        return "".join(self.emitted)


@dataclass
class Sampler:
    """temperature 0: the most likely token (greedy); else softmax(logits / T), cut to the smallest set whose
    probability reaches ``top_p`` (nucleus), drawn with a generator seeded by ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _gen: Any = field(default=None, repr=False)

    def __call__(self, logits: Any) -> int:
        import torch

        if self.temperature <= 0:
            return int(logits.argmax())
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < self.top_p  # the first token is always kept
            probs = torch.zeros_like(probs).scatter_(-1, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._gen))


@dataclass
class Generated:
    ids: list[int] = field(default_factory=list)
    stop: str = "max_new_tokens"
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


def generate(model: Any, prompt_ids: Any, max_new: int, eos: set[int], sampler: Sampler,
             on_token: Callable[[int], None], result: Generated | None = None) -> Generated:
    """Prefill ``prompt_ids`` (1, T) then decode up to ``max_new`` tokens, calling ``on_token`` for each id
    (the EOS id ends generation and is not passed on). ``result`` is filled as it goes, so a caller that
    catches an interruption still has what was generated."""
    import torch

    from owlctl.deploy.onnx import _cache_kwarg, _out_cache, make_cache

    res = result if result is not None else Generated()
    cache_kw = _cache_kwarg(model)
    cache = make_cache(model.config, [])
    ids = prompt_ids
    with torch.inference_mode():
        for step in range(max_new):
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
            nxt = sampler(out.logits[0, -1])
            dt = time.perf_counter() - t
            if step == 0:
                res.prefill_s = dt
            else:
                res.step_s.append(dt)
            if nxt in eos:
                res.stop = "eos"
                return res
            res.ids.append(nxt)
            on_token(nxt)
            cache = _out_cache(out)
            ids = torch.tensor([[nxt]], device=prompt_ids.device)
    return res
