"""Perplexity follows the reference protocol (SPEC 7.1) exactly: checked against a naive loop written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from owlctl.engine.evaluation.perplexity import perplexity, windows
from owlctl.errors import DataError, InputError

SEQLEN = 32


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    return m.eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 260, (7 * SEQLEN + 11,), generator=g)  # 7 windows and a remainder of 11 tokens


def naive_ppl(model, ids, seqlen, n_windows=None):
    """The reference loop, one window per forward: mean CE of positions 0..T-2 predicting 1..T-1 (float64),
    ppl = exp(mean over windows)."""
    w = ids.numel() // seqlen if n_windows is None else n_windows
    ces = []
    with torch.no_grad():
        for k in range(w):
            x = ids[k * seqlen:(k + 1) * seqlen]
            logits = model(x[None]).logits[0]
            ces.append(F.cross_entropy(logits[:-1].double(), x[1:]).item())
    return math.exp(sum(ces) / len(ces)), ces


def test_matches_naive_loop(model, ids):
    want, ces = naive_ppl(model, ids, SEQLEN)
    got = perplexity(model, ids, SEQLEN)
    assert got["ppl"] == pytest.approx(want, rel=1e-6)
    assert got["windows"] == 7 and got["tokens"] == 7 * SEQLEN and got["seqlen"] == SEQLEN
    assert got["predictions"] == 7 * (SEQLEN - 1)
    assert got["window_nll"] == pytest.approx(ces, rel=1e-6)
    assert got["nll_mean"] == pytest.approx(sum(got["window_nll"]) / 7, rel=1e-12)
    assert math.exp(got["nll_mean"]) == pytest.approx(got["ppl"], rel=1e-12)


def test_batching_does_not_change_the_result(model, ids):
    one = perplexity(model, ids, SEQLEN, batch_size=1)
    three = perplexity(model, ids, SEQLEN, batch_size=3)  # 7 windows: batches of 3, 3, 1
    assert three["windows"] == one["windows"] == 7
    assert three["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    assert three["window_nll"] == pytest.approx(one["window_nll"], rel=1e-6)


def test_remainder_is_dropped(model, ids):
    full = perplexity(model, ids, SEQLEN)
    trimmed = perplexity(model, ids[: 7 * SEQLEN], SEQLEN)
    assert full["ppl"] == trimmed["ppl"]
    # changing the dropped tail changes nothing
    other_tail = torch.cat([ids[: 7 * SEQLEN], torch.zeros(11, dtype=torch.long)])
    assert perplexity(model, other_tail, SEQLEN)["ppl"] == full["ppl"]


def test_max_windows_takes_the_first_windows(model, ids):
    want, _ = naive_ppl(model, ids, SEQLEN, n_windows=2)
    got = perplexity(model, ids, SEQLEN, max_windows=2, batch_size=2)
    assert got["windows"] == 2 and got["tokens"] == 2 * SEQLEN
    assert got["ppl"] == pytest.approx(want, rel=1e-6)
    assert perplexity(model, ids, SEQLEN, max_windows=100)["windows"] == 7  # a cap, never more windows


def test_windows_shape():
    w = windows(torch.arange(100), 30)
    assert w.shape == (3, 30) and w[2, 0].item() == 60


def test_corpus_shorter_than_one_window(model):
    with pytest.raises(DataError) as e:
        perplexity(model, torch.arange(20), SEQLEN)
    assert "--seqlen" in e.value.hint


def test_bad_lengths(model, ids):
    with pytest.raises(InputError, match="max_position_embeddings"):
        perplexity(model, torch.zeros(2000, dtype=torch.long), 1024)  # the tiny model has 512 positions
    with pytest.raises(InputError):
        perplexity(model, ids, 1)
    with pytest.raises(InputError):
        perplexity(model, ids, SEQLEN, batch_size=0)
    with pytest.raises(InputError):
        perplexity(model, ids, SEQLEN, max_windows=0)


def test_progress_is_advanced_per_batch(model, ids):
    calls = []

    class Task:
        def advance(self, n=1, info=None):
            calls.append(n)

    class Progress:
        def task(self, desc, total):
            from contextlib import nullcontext

            calls.append(("total", total))
            return nullcontext(Task())

    perplexity(model, ids, SEQLEN, batch_size=3, progress=Progress())
    assert calls == [("total", 7), 3, 3, 1]


def test_windows_with_bos():
    w = windows(torch.arange(100), 30, bos_id=999)
    assert w.shape == (3, 30)  # floor(100 / 29) windows of BOS + 29 stream tokens
    for k in range(3):
        assert w[k, 0].item() == 999 and w[k, 1:].tolist() == list(range(k * 29, (k + 1) * 29))
    assert windows(torch.arange(100), 30, max_windows=2, bos_id=999).shape == (2, 30)
    with pytest.raises(DataError):
        windows(torch.arange(28), 30, bos_id=999)


def test_bos_per_window_matches_naive_loop(model, ids):
    """--bos always: every window is [BOS] + T-1 stream tokens; the T-1 predictions after BOS are scored."""
    bos = 257
    body = SEQLEN - 1
    w = ids.numel() // body
    ces = []
    with torch.no_grad():
        for k in range(w):
            x = torch.cat([torch.tensor([bos]), ids[k * body:(k + 1) * body]])
            logits = model(x[None]).logits[0]
            ces.append(F.cross_entropy(logits[:-1].double(), x[1:]).item())
    got = perplexity(model, ids, SEQLEN, batch_size=3, bos_id=bos)
    assert got["windows"] == w and got["predictions"] == w * body and got["bos"] == "always"
    assert got["stream_tokens_used"] == w * body
    assert got["ppl"] == pytest.approx(math.exp(sum(ces) / w), rel=1e-6)
    assert got["window_nll"] == pytest.approx(ces, rel=1e-6)
    assert perplexity(model, ids, SEQLEN)["bos"] == "never"
