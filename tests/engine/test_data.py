"""Calibration data: seeded and hashed, disjoint built-in splits, clear errors for bad sources."""

import json

import pytest
from transformers import AutoTokenizer

from owlctl.engine.data import (
    CHAR_RULE,
    SPLIT_RULE,
    bos_warning,
    calibration,
    documents,
    fingerprint_overlap,
    overlap_texts,
    resolve_bos,
    split_info,
    text_fingerprint,
    tokenizer_adds_bos,
    wiki_articles,
)
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


# ------------------------------------------------------------------------------------ local splits
def _paras(path):
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]


def test_local_text_has_disjoint_index_splits(text_file):
    paras = _paras(text_file)
    assert len(paras) >= 20
    got = {s: documents(str(text_file), s)[0] for s in ("calib", "validation", "test")}
    assert got["test"] == [p for i, p in enumerate(paras) if i % 20 == 0]
    assert got["validation"] == [p for i, p in enumerate(paras) if i % 20 == 1]
    assert got["calib"] == [p for i, p in enumerate(paras) if i % 20 > 1]
    info = split_info(str(text_file))
    assert info["rule"] == SPLIT_RULE and info["unit"] == "paragraph"
    assert info["documents"] == len(paras) and info["calib_documents"] == len(got["calib"])


def test_few_documents_fall_back_to_character_ranges(tmp_path):
    p = tmp_path / "one.txt"
    words = [f"w{i}" for i in range(400)]
    p.write_text(" ".join(words))  # a single paragraph
    parts = {s: documents(str(p), s)[0] for s in ("calib", "validation", "test")}
    assert all(len(v) == 1 for v in parts.values())
    # contiguous, disjoint, cut at whitespace, together the whole text
    assert " ".join(parts["calib"] + parts["validation"] + parts["test"]).split() == words
    n = len(" ".join(words))
    assert abs(len(parts["calib"][0]) - 0.9 * n) < 8 and abs(len(parts["test"][0]) - 0.05 * n) < 8
    assert split_info(str(p))["rule"] == CHAR_RULE


def test_jsonl_records_and_folder_files_are_documents(tmp_path):
    recs = tmp_path / "r.jsonl"
    recs.write_text("".join(json.dumps({"text": f"record {i} " * 3}) + "\n" for i in range(25)))
    assert documents(str(recs), "test")[0] == [f"record {i} " * 3 for i in (0, 20)]
    assert split_info(str(recs))["unit"] == "record"
    folder = tmp_path / "f"
    for i in range(21):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"doc{i:02d}.txt").write_text(f"file {i}\n\nsecond paragraph of {i}")
    order = sorted(f"sub{i % 2}/doc{i:02d}.txt" for i in range(21))  # sorted by relative path
    want = [(folder / order[0]).read_text(), (folder / order[20]).read_text()]
    assert documents(str(folder), "test")[0] == want
    assert split_info(str(folder))["unit"] == "file"


# ------------------------------------------------------------------------------------------- BOS
def test_resolve_bos(tiny_llama, tiny_llama_bos):
    plain, adds = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama_bos)
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(adds)
    assert resolve_bos(plain, "auto") == "never" and resolve_bos(adds, "auto") == "always"
    assert resolve_bos(adds, "never") == "never" and resolve_bos(plain, "always") == "always"
    assert bos_warning(adds, "never") and not bos_warning(adds, "always") and not bos_warning(plain, "never")
    with pytest.raises(InputError, match="--bos"):
        resolve_bos(plain, "sometimes")
    plain.bos_token = None
    with pytest.raises(InputError, match="no BOS"):
        resolve_bos(plain, "always")


@pytest.mark.parametrize("bos", ["always", "never"])
def test_calibration_windows_start_with_bos_exactly_when_asked(bos, tiny_llama_bos, text_file):
    import random


    tok = AutoTokenizer.from_pretrained(tiny_llama_bos)
    cal = calibration(str(text_file), tok, nsamples=6, seqlen=20, seed=4, bos=bos)
    assert cal.bos == bos and cal.as_dict()["bos"] == bos
    text = "\n\n".join(documents(str(text_file), "calib")[0])
    stream = tok(text, add_special_tokens=bos == "never").input_ids
    body = 19 if bos == "always" else 20
    rng = random.Random(4)
    for row in cal.input_ids.tolist():  # the windows, by hand
        start = rng.randint(0, len(stream) - body - 1)
        assert row == ([257] if bos == "always" else []) + stream[start:start + body]
    first = cal.input_ids[:, 0]
    assert bool((first == 257).all()) == (bos == "always")
    assert (cal.input_ids[:, 1:] == 257).sum() == 0  # BOS never inside a window
    assert stream[0] == 257 if bos == "never" else stream[0] != 257  # "never": only the stream start has it


def test_jsonl_document_windows_with_bos(tiny_llama_bos, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_bos)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"document {i} " * 6}) + "\n" for i in range(3)))
    cal = calibration(str(p), tok, nsamples=4, seqlen=16, seed=0, bos="always")
    assert (cal.input_ids[:, 0] == 257).all() and (cal.input_ids[:, 1:] != 257).all()


# ---------------------------------------------------------------------------------- fingerprints
def test_fingerprint_catches_a_folder_and_one_of_its_files(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(24):
        (folder / f"{i:02d}.txt").write_text(f"File number {i} talks about topic {i} at some length here.\n\n"
                                             f"And a second paragraph for file {i}, also long enough.")
    fp = text_fingerprint(documents(str(folder), "calib")[0])
    inside = folder / "05.txt"  # index 5: a calibration file
    outside = folder / "00.txt"  # index 0: the test split
    _, hits, _ = fingerprint_overlap(fp, [inside.read_text()])
    assert hits == 2
    assert fingerprint_overlap(fp, documents(str(folder), "test")[0])[1] == 0
    assert fingerprint_overlap(fp, [outside.read_text()])[1] == 0


def test_fingerprint_samples_by_content_when_large():
    texts = [f"paragraph number {i} with enough characters to count" for i in range(3000)]
    fp = text_fingerprint(texts)["paragraphs"]
    assert fp["count"] == 3000 and fp["sample_mod"] == 4 and 0 < len(fp["sha256_16"]) <= 1024 * 1.2
    checked, hits, _ = fingerprint_overlap({"paragraphs": fp}, texts)
    assert checked == hits == len(fp["sha256_16"])  # every sampled paragraph is found, others not checked


def test_fingerprint_with_character_ranges(tmp_path):
    """Few documents (character rule): the held-out splits of the same file never count as overlap, although
    the paragraph at each cut is shared; another file holding a calibration paragraph does."""
    p = tmp_path / "few.txt"
    paras = [" ".join(f"word{k}x{i}" for i in range(60)) for k in range(3)]
    p.write_text("\n\n".join(paras))
    fp = text_fingerprint(documents(str(p), "calib")[0])
    for split in ("validation", "test"):
        assert overlap_texts(str(p), split) == [paras[2]]  # the whole paragraph the range touches
        assert fingerprint_overlap(fp, overlap_texts(str(p), split))[1] == 0
    other = tmp_path / "other.txt"
    other.write_text(paras[0])  # one paragraph: its test split is a fragment, checked as the whole paragraph
    assert fingerprint_overlap(fp, overlap_texts(str(other), "test"))[1] == 1
