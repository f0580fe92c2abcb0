"""The generation runtime (deploy/runtimes/generation.py, ops/generate.py): greedy tokens of the dense and the
sparse-kernel backends equal transformers' own greedy ``generate``; text comes out piece by piece while
decoding runs and multi-byte characters are never split; the chat template is applied when present."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from owlctl.deploy.runtimes.generation import Generated, Sampler, TextPieces
from owlctl.deploy.runtimes.generation import generate as run
from owlctl.engine.models import load_model
from owlctl.ops.generate import GenerateConfig, generate

NEW = 24


@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    return pruned_tiny(0.7)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=259,
                          eos_token_id=None)
    model.generation_config.eos_token_id = model.config.eos_token_id = None  # n tokens, as ours with eos=set()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=gc)
    return out[0, len(ids):].tolist()


def _ours(model, ids: list[int], n: int) -> list[int]:
    got: list[int] = []
    res = run(model, torch.tensor([ids]), n, set(), Sampler(), got.append)
    assert res.ids == got and res.stop == "max_new_tokens" and len(res.step_s) == n - 1
    return got


def test_greedy_tokens_equal_transformers_for_dense_and_sparse_kernels(pruned):
    from owlctl.deploy.kernels.linear import sparsify

    model, tok, _ = load_model(str(pruned))
    ids = tok("Sparse models keep most of their quality.")["input_ids"]
    expected = _hf_greedy(model, ids, NEW)
    assert len(expected) == NEW
    assert _ours(model, ids, NEW) == expected
    info = sparsify(model, "auto", threads=2)
    assert info["kernel"] == "bitmask" and info["swapped"] > 0
    assert _ours(model, ids, NEW) == expected


def test_eos_stops_and_is_not_emitted(pruned):
    model, tok, _ = load_model(str(pruned))
    ids = tok("Outliers")["input_ids"]
    greedy = _ours(model, ids, 8)
    stop = greedy[3]
    got: list[int] = []
    res = run(model, torch.tensor([ids]), 8, {stop}, Sampler(), got.append)
    assert res.stop == "eos" and got == greedy[:greedy.index(stop)]


def test_sampling_is_seeded():
    logits = torch.randn(300)
    a = [Sampler(temperature=1.0, seed=3)(logits) for _ in range(1)]
    s1, s2 = Sampler(temperature=1.0, seed=3), Sampler(temperature=1.0, seed=3)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]
    assert a[0] == Sampler(temperature=1.0, seed=3)(logits)
    top = Sampler(temperature=1.0, top_p=1e-6, seed=0)  # the nucleus holds only the most likely token
    assert all(top(logits) == int(logits.argmax()) for _ in range(10))
    assert Sampler()(logits) == int(logits.argmax())


def test_text_pieces_never_split_a_character():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo wörld € 🦉 done"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span tokens
    pieces = TextPieces(tok)
    out = [pieces.push(i) for i in ids]
    out.append(pieces.finish())
    assert "".join(out) == text == pieces.text
    assert all("\ufffd" not in p for p in out)
    owl = text.encode().index("🦉".encode())
    assert out[owl:owl + 3] == ["", "", ""] and out[owl + 3] == "🦉"  # held back until the 4th byte


def test_text_is_handed_out_while_decoding_runs(pruned, monkeypatch):
    """The first pieces reach the callback after a few forward passes, not after all of them."""
    import owlctl.deploy.runtimes.generation as g

    calls = {"forward": 0}
    seen_at: list[int] = []
    real = g.generate

    def counting(model, *a, **kw):
        hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
        try:
            return real(model, *a, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(g, "generate", counting)
    doc = generate(GenerateConfig(model=str(pruned), prompt="Note 1:", max_new_tokens=40, raw=True, threads=1),
                   on_text=lambda piece: seen_at.append(calls["forward"]))
    assert doc["generated_tokens"] == 40 and len(seen_at) > 5
    assert seen_at[0] < 20 and seen_at == sorted(seen_at) and len(set(seen_at)) > 5


@pytest.fixture(scope="module")
def chat_model(pruned, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat") / "ck"
    shutil.copytree(pruned, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_chat_template_is_used_when_present_and_raw_turns_it_off(chat_model, pruned):
    _, tok, _ = load_model(str(chat_model))
    assert tok.chat_template
    expected = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"]
    templated = generate(GenerateConfig(model=str(chat_model), prompt="hi", max_new_tokens=2, threads=1))
    raw = generate(GenerateConfig(model=str(chat_model), prompt="hi", max_new_tokens=2, threads=1, raw=True))
    none = generate(GenerateConfig(model=str(pruned), prompt="hi", max_new_tokens=2, threads=1))
    assert templated["prompt"] == {"text": "hi", "tokens": len(expected), "chat_template": True}
    assert raw["prompt"]["chat_template"] is False and raw["prompt"]["tokens"] == len(tok("hi")["input_ids"])
    assert none["prompt"]["chat_template"] is False


def test_generated_result_is_filled_as_it_goes(pruned):
    model, tok, _ = load_model(str(pruned))
    res = Generated()

    def stop_after_three(i: int) -> None:
        if len(res.ids) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(model, torch.tensor([tok("Note")["input_ids"]]), 10, set(), Sampler(), stop_after_three, res)
    assert len(res.ids) == 3 and res.prefill_s > 0
