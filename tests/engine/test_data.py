"""Calibration data: seeded and hashed, disjoint built-in splits, clear errors for bad sources."""

import pytest
from transformers import AutoTokenizer

from owlctl.engine.data import calibration, documents, wiki_articles
from owlctl.errors import DataError, InputError


def test_seeded_and_hashed(tiny_llama, text_file):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    a = calibration(str(text_file), tok, nsamples=4, seqlen=32, seed=0)
    b = calibration(str(text_file), tok, nsamples=4, seqlen=32, seed=0)
    c = calibration(str(text_file), tok, nsamples=4, seqlen=32, seed=1)
    assert a.input_ids.shape == (4, 32)
    assert a.sha256 == b.sha256 and bool((a.input_ids == b.input_ids).all())
    assert a.sha256 != c.sha256


def test_corpus_too_short(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(DataError, match="fewer than --nsamples x --seqlen"):
        calibration(str(short), tok, nsamples=4, seqlen=32)


def test_jsonl_documents_follow_reference_sampling(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "tiny"}\n' + '{"text": "%s"}\n' % ("long document " * 20))
    cal = calibration(str(p), tok, nsamples=3, seqlen=16, seed=0)
    assert cal.input_ids.shape == (3, 16)  # only the long document can supply windows
    with pytest.raises(DataError, match="too few documents"):
        calibration(str(p), tok, nsamples=1, seqlen=1000)


def test_bad_sources():
    with pytest.raises(InputError, match="neither a known corpus"):
        documents("no/such/file.txt", "calib")
    with pytest.raises(InputError, match="built-in corpus"):
        documents("builtin:nope", "calib")


def test_unreachable_hub_fails_fast_with_hint():
    # tests run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 (conftest): the hub cannot be reached
    with pytest.raises(DataError) as e:
        documents("wikitext2", "test")
    assert "local" in (e.value.hint or "")


def test_builtin_wiki_splits_are_disjoint():
    calib, val, test = (set(wiki_articles(s)) for s in ("calib", "validation", "test"))
    assert calib and val and test
    assert not (calib & val) and not (calib & test) and not (val & test)
