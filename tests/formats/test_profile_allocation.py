"""profile.json / allocation.json contracts: validation with readable errors, atomic round trips."""

from __future__ import annotations

import copy
import json

import pytest

from owlctl.errors import FormatError, InputError, OutputExistsError
from owlctl.formats._io import dumps, sha256_file
from owlctl.formats.allocation import (
    allocation_sha256,
    build_allocation_doc,
    read_allocation,
    validate_allocation,
    write_allocation,
)
from owlctl.formats.profile import block_numels, block_ratios, m_key, profiled_m, read_profile, validate_profile

# block numels 1000 each; M=5 counts 10, 20, 30, 20 -> D = 1, 2, 3, 2 %
COUNTS = {"3": [40, 50, 90, 60], "5": [10, 20, 30, 20], "6.5": [1, 2, 3, 2]}


def make_profile() -> dict:
    blocks = []
    for i in range(4):
        counts = {k: v[i] for k, v in COUNTS.items()}
        half = {k: c // 2 for k, c in counts.items()}
        blocks.append({
            "index": i, "name": f"model.layers.{i}", "numel": 1000, "mean_score": 0.5, "score_sum": 500.0,
            "outlier_count": counts, "outlier_pct": {k: c / 10 for k, c in counts.items()},
            "linears": [
                {"name": "self_attn.q_proj", "shape": [10, 50], "numel": 500, "score_sum": 250.0,
                 "max_score": 9.0, "outlier_count": half},
                {"name": "mlp.down_proj", "shape": [50, 10], "numel": 500, "score_sum": 250.0,
                 "max_score": 7.5, "outlier_count": {k: c - half[k] for k, c in counts.items()}},
            ]})
    return {
        "schema": "owlctl.profile/1", "owlctl_version": "0.1.0", "created": "2024-01-01T00:00:00+00:00",
        "model": {"id": "tiny/llama", "model_type": "llama", "family": "llama", "revision": None,
                  "content_sha256": "ab" * 32, "num_blocks": 4},
        "calibration": {"source": "builtin:wiki", "nsamples": 4, "seqlen": 16, "seed": 0, "tokens_sha256": "cd" * 32},
        "score": {"name": "wanda", "definition": "|W| * ||X||", "outlier_rule": "score > M * block mean (strict)",
                  "pct_units": "percent"},
        "outlier_m": [3.0, 5.0, 6.5],
        "blocks": blocks,
    }


def write(tmp_path, doc, name="profile.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_m_key():
    assert m_key(5.0) == "5" and m_key(5) == "5" and m_key(5.5) == "5.5" and m_key(6.50) == "6.5"


def test_read_valid_profile(tmp_path):
    p = write(tmp_path, make_profile())
    doc, sha = read_profile(p)
    assert sha == sha256_file(p) and len(sha) == 64
    assert block_ratios(doc, 5) == [1.0, 2.0, 3.0, 2.0]
    assert block_ratios(doc, 6.5) == [0.1, 0.2, 0.3, 0.2]
    assert block_numels(doc) == [1000] * 4
    assert profiled_m(doc) == [3.0, 5.0, 6.5]


def test_ratios_come_from_counts_not_stored_pct():
    doc = make_profile()
    doc["blocks"][0]["outlier_pct"]["5"] = 99.0  # a stale percentage is ignored
    assert block_ratios(validate_profile(doc), 5.0)[0] == 1.0


def test_unprofiled_m_is_an_input_error():
    with pytest.raises(InputError) as e:
        block_ratios(make_profile(), 4)
    assert "M = 4 was not profiled" in e.value.message and "3, 5, 6.5" in e.value.message
    assert "--outlier-m 3,4,5,6.5" in e.value.hint


def test_truncated_json(tmp_path):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(make_profile())[:300])
    with pytest.raises(FormatError, match="not valid JSON"):
        read_profile(p)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        read_profile(tmp_path / "nope.json")


@pytest.mark.parametrize("schema, match", [
    ("owlctl.profile/3", "owlctl.profile/3"), ("owlctl.profile/0", "reads owlctl.profile/2"),
    ("owlctl.allocation/1", "not an owlctl profile"), (None, "not an owlctl profile"),
])
def test_wrong_schema(tmp_path, schema, match):
    doc = make_profile()
    doc["schema"] = schema
    with pytest.raises(FormatError, match=match):
        read_profile(write(tmp_path, doc))


def _drop(path):
    def edit(doc):
        *parents, last = path
        d = doc
        for k in parents:
            d = d[k]
        del d[last]
    return edit


def _set(path, value):
    def edit(doc):
        *parents, last = path
        d = doc
        for k in parents:
            d = d[k]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_drop(["blocks", 2, "numel"]), r"blocks\[2\]\.numel is missing"),
    (_drop(["model"]), r"profile\.model is missing"),
    (_drop(["calibration", "seed"]), r"calibration\.seed is missing"),
    (_set(["model", "num_blocks"], 5), "lists 4 blocks but model.num_blocks is 5"),
    (_set(["model", "num_blocks"], "4"), r"model\.num_blocks must be an integer"),
    (_set(["blocks", 1, "index"], 3), r"block indices must be 0\.\.3"),
    (_set(["blocks", 1, "outlier_count", "5"], 1001), r"outside \[0, numel=1000\]"),
    (_set(["blocks", 1, "outlier_count", "5"], 2.5), "must be an integer"),
    (_set(["blocks", 1, "outlier_count", "5"], True), "must be an integer"),
    (_set(["outlier_m"], [3.0, 5.0, 7.0]), r"has M keys .* but outlier_m lists"),
    (_set(["outlier_m"], []), "outlier_m is empty"),
    (_set(["outlier_m"], [3.0, 5.0, 5.0]), "twice"),
    (_set(["blocks", 0, "linears", 0, "numel"], 499), "shape .* holds 500"),
    (_set(["blocks", 0, "linears", 0, "shape"], [10]), r"shape must be \[C_out, C_in\]"),
    (_set(["blocks", 0, "numel"], 999), "linears hold 1000 weights"),
    (_set(["blocks", 0, "mean_score"], float("nan")), "finite number"),
    (_set(["blocks"], {"0": {}}), "must be a list"),
    (_set(["blocks", 3], "block"), r"blocks\[3\] must be an object"),
])
def test_malformed_profile_gives_clear_format_error(tmp_path, edit, match):
    doc = make_profile()
    edit(doc)
    with pytest.raises(FormatError, match=match) as e:
        read_profile(write(tmp_path, doc))
    assert "owlctl profile" in e.value.hint


# ------------------------------------------------------------------------------------------------ allocation
PARAMS = {"allocator": "owl", "target_sparsity": 0.7, "outlier_m": 5.0, "lambda": 0.08, "balance": "blocks",
          "clamp": "redistribute", "min_sparsity": 0.0, "max_sparsity": 0.99, "special": False}


def make_allocation(**kw) -> dict:
    args = dict(block_names=[f"model.layers.{i}" for i in range(4)], block_numels=[1000, 1000, 2000, 1000],
                outlier_pcts=[1.0, 2.0, 3.0, 2.0], model=make_profile()["model"], params=PARAMS,
                pattern={"kind": "unstructured"}, sparsities=[0.78, 0.7, 0.62, 0.7], profile_sha256="ef" * 32,
                profile_path="profile.json") | kw
    return build_allocation_doc(**args)


def test_build_allocation_sparsity_fields():
    doc = make_allocation()
    assert doc["schema"] == "owlctl.allocation/2" and doc["created"]
    assert doc["mean_block_sparsity"] == pytest.approx(0.7)
    assert doc["allocated_sparsity"] == pytest.approx((0.78 + 0.7 + 2 * 0.62 + 0.7) / 5)
    assert doc["drift"] == pytest.approx(doc["allocated_sparsity"] - 0.7)
    assert [b["n_keep"] for b in doc["blocks"]] == [None] * 4


def test_build_nm_allocation():
    params = PARAMS | {"target_sparsity": None, "outlier_m": 6.0, "lambda": 2.0}
    doc = make_allocation(params=params, pattern={"kind": "nm", "n_keep": 3, "m": 8}, sparsities=None,
                          n_keeps=[2, 3, 4, 3])
    assert [b["sparsity"] for b in doc["blocks"]] == [0.75, 0.625, 0.5, 0.625]
    assert doc["target_sparsity"] == 0.625
    assert doc["drift"] == pytest.approx((0.75 + 0.625 + 1.0 + 0.625) / 5 - 0.625)


def test_allocation_round_trip_and_sha(tmp_path):
    doc = make_allocation()
    p = write_allocation(doc, tmp_path / "allocation.json")
    back, sha = read_allocation(p)
    assert back == doc
    assert sha == allocation_sha256(doc) == sha256_file(p)
    assert p.read_text() == dumps(doc)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["allocation.json"]  # no temp file left behind


def test_allocation_existing_output_refused(tmp_path):
    p = tmp_path / "allocation.json"
    p.write_text("keep me")
    with pytest.raises(OutputExistsError):
        write_allocation(make_allocation(), p)
    assert p.read_text() == "keep me"
    write_allocation(make_allocation(), p, force=True)
    assert read_allocation(p)[0]["schema"] == "owlctl.allocation/2"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["allocation.json"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import owlctl.formats._io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(RuntimeError):
        write_allocation(make_allocation(), tmp_path / "allocation.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, match", [
    (_set(["blocks", 1, "sparsity"], 1.0), r"sparsity must be in \[0, 1\)"),
    (_set(["blocks", 1, "n_keep"], 3), "n_keep must be null"),
    (_drop(["params", "lambda"]), r"params\.lambda is missing"),
    (_set(["params", "clamp"], "sometimes"), "expected one of redistribute"),
    (_set(["pattern"], {"kind": "nm", "n_keep": 5, "m": 4}), "pattern 5:4 is invalid"),
    (_set(["pattern"], {"kind": "blocky"}), "pattern.kind"),
    (_set(["blocks"], []), "blocks is empty"),
    (_set(["model", "num_blocks"], 3), "lists 4 blocks but model.num_blocks is 3"),
    (_drop(["allocated_sparsity"]), r"allocation\.allocated_sparsity is missing"),
])
def test_malformed_allocation(tmp_path, edit, match):
    doc = copy.deepcopy(make_allocation())
    edit(doc)
    p = write(tmp_path, doc, "allocation.json")
    with pytest.raises(FormatError, match=match) as e:
        read_allocation(p)
    assert "owlctl allocate" in e.value.hint


def test_nm_sparsity_must_match_n_keep():
    params = PARAMS | {"target_sparsity": None}
    doc = make_allocation(params=params, pattern={"kind": "nm", "n_keep": 3, "m": 8}, sparsities=None,
                          n_keeps=[2, 3, 4, 3])
    doc["blocks"][0]["sparsity"] = 0.5
    with pytest.raises(FormatError, match="does not match n_keep 2 of 8"):
        validate_allocation(doc)


def test_allocation_wrong_schema(tmp_path):
    p = write(tmp_path, make_profile(), "allocation.json")
    with pytest.raises(FormatError, match="not an owlctl allocation"):
        read_allocation(p)


# ------------------------------------------------------------------------------- Python API (owlctl.ops)
def test_allocation_from_profile_param_balance():
    from owlctl.engine.allocation import allocation_from_profile
    from owlctl.formats.allocation import block_sparsities

    doc = make_profile()
    doc["blocks"][2]["numel"] = 3000  # heterogeneous blocks
    doc["blocks"][2]["linears"][1]["shape"] = [50, 50]
    doc["blocks"][2]["linears"][1]["numel"] = 2500
    out = allocation_from_profile(doc, None, None, target_sparsity=0.7, outlier_m=3, balance="params")
    assert out["allocated_sparsity"] == pytest.approx(0.7, abs=1e-12)
    assert out["mean_block_sparsity"] != pytest.approx(0.7, abs=1e-6)
    assert out["blocks"][2]["outlier_pct"] == pytest.approx(3.0)  # 90 of 3000
    ref = allocation_from_profile(doc, None, None, target_sparsity=0.7, outlier_m=3)
    assert ref["mean_block_sparsity"] == pytest.approx(0.7, abs=1e-12)
    assert block_sparsities(ref) != block_sparsities(out)


def test_allocation_from_profile_rejects_bad_profile():
    from owlctl.engine.allocation import allocation_from_profile

    doc = make_profile()
    del doc["blocks"][0]["linears"]
    with pytest.raises(FormatError, match=r"blocks\[0\]\.linears is missing"):
        allocation_from_profile(doc, None, "p.json", target_sparsity=0.5)


def test_uniform_allocation_without_profile():
    from owlctl.engine.allocation import uniform_allocation

    model = {"id": "tiny", "num_blocks": 3}
    doc = uniform_allocation(model, ["a", "b", "c"], [10, 20, 30], target_sparsity=0.5)
    assert doc["profile"] == {"sha256": None, "path": None, "calibration": None}
    assert [b["sparsity"] for b in doc["blocks"]] == [0.5] * 3 and doc["drift"] == 0.0
    nm = uniform_allocation(model, ["a", "b", "c"], [10, 20, 30], pattern="2:4")
    assert [b["n_keep"] for b in nm["blocks"]] == [2, 2, 2] and nm["target_sparsity"] == 0.5
    with pytest.raises(InputError, match="--target-sparsity is required"):
        uniform_allocation(model, ["a"], [10])
    with pytest.raises(InputError, match="KEPT|N must be") as e:
        uniform_allocation(model, ["a"], [10], pattern="5:4")
    assert "KEPT" in e.value.hint


def test_allocate_refuses_existing_output_before_any_work(tmp_path):
    from owlctl.ops.allocate import AllocateConfig, allocate

    out = tmp_path / "allocation.json"
    out.write_text("x")
    # the profile does not even exist: the output check comes first
    with pytest.raises(OutputExistsError):
        allocate(AllocateConfig(profile=tmp_path / "missing.json", target_sparsity=0.7, output=out))
    p = write(tmp_path, make_profile())
    doc = allocate(AllocateConfig(profile=p, target_sparsity=0.7, output=out, force=True))
    assert read_allocation(out)[0] == doc and doc["profile"]["sha256"] == sha256_file(p)
