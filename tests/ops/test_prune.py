"""prune / nm end to end on tiny models: realised sparsity equals the allocation, checkpoints load with plain
transformers, bad input fails early and leaves nothing behind."""

import json

import pytest
import torch
from tiny import FAMILIES
from transformers import AutoModelForCausalLM

from owlctl.errors import InputError, OutputExistsError
from owlctl.formats.checkpoint import read_checkpoint_records
from owlctl.ops.profile import ProfileConfig, profile
from owlctl.ops.prune import PruneConfig, nm, prune

CAL = dict(nsamples=4, seqlen=32, device="cpu")


def _cfg(model, out, text_file, **kw):
    return PruneConfig(model=str(model), output=out, calib=str(text_file), **CAL, **kw)


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "profile.json"
    profile(ProfileConfig(model=str(tiny_llama), output=path, calib=str(text_file), nsamples=4, seqlen=32,
                          device="cpu"))
    return path


@pytest.mark.parametrize("model_type", FAMILIES)
def test_wanda_owl_every_family(model_type, tiny_models, text_file, tmp_path):
    model = tiny_models(model_type)
    prof = tmp_path / "p.json"
    profile(ProfileConfig(model=str(model), output=prof, calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    res = prune(_cfg(model, tmp_path / "ck", text_file, method="wanda", from_profile=prof, target_sparsity=0.6,
                     lam=0.1))
    assert res["mask_mismatches"] == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    rec = read_checkpoint_records(tmp_path / "ck")
    alloc = rec["allocation"]
    from owlctl.families import resolve

    layout = resolve(out)
    for blk in alloc["blocks"]:
        s = blk["sparsity"]
        for name, lin in layout.linears(blk["index"]).items():
            w = lin.weight
            per_row = (w == 0).sum(dim=1)
            k = int(w.shape[1] * s + 1e-9)
            assert torch.all(per_row == k), (model_type, blk["index"], name)  # Wanda: floor(C_in*s) per row
    assert rec["report"]["realised_sparsity"] == pytest.approx(res["realised_sparsity"])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_methods_uniform_realise_allocation(method, tiny_llama, text_file, tmp_path):
    res = prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method=method, uniform=True, target_sparsity=0.5))
    assert res["mask_mismatches"] == 0
    assert res["realised_sparsity"] == pytest.approx(0.5, abs=0.01)
    rep = json.loads((tmp_path / "ck" / "owlctl-report.json").read_text())
    for b in rep["blocks"]:
        for lin in b["linears"]:
            assert lin["pruned"] == lin["expected_pruned"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_2_4_every_group(method, tiny_llama, text_file, tmp_path):
    nm(_cfg(tiny_llama, tmp_path / "ck", text_file, method=method, uniform=True, pattern="2:4"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for name, p in model.named_parameters():
        if p.dim() == 2 and "layers" in name:
            groups = (p == 0).reshape(p.shape[0], -1, 4).sum(-1)
            assert torch.all(groups == 2), name


def test_mixed_nm_from_profile(tiny_llama, text_file, tiny_profile, tmp_path):
    res = nm(_cfg(tiny_llama, tmp_path / "ck", text_file, method="wanda", from_profile=tiny_profile,
                  pattern="3:8", lam=2, outlier_m=6))
    alloc = read_checkpoint_records(tmp_path / "ck")["allocation"]
    keeps = [b["n_keep"] for b in alloc["blocks"]]
    assert set(keeps) <= {2, 3, 4} and len(set(keeps)) > 1
    for b, k in zip(res["blocks"], keeps):
        assert b["realised_sparsity"] == pytest.approx(1 - k / 8)


def test_allocation_file_and_metadata(tiny_llama, text_file, tiny_profile, tmp_path):
    from safetensors import safe_open

    from owlctl.ops.allocate import AllocateConfig, allocate

    allocate(AllocateConfig(profile=tiny_profile, target_sparsity=0.7, output=tmp_path / "a.json"))
    prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method="wanda", allocation=tmp_path / "a.json"))
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["owlctl.allocation"])["params"]["target_sparsity"] == 0.7
    assert meta["owlctl.version"]
    from owlctl.formats.allocation import allocation_sha256

    assert meta["owlctl.allocation_sha256"] == allocation_sha256(json.loads(meta["owlctl.allocation"]))


def test_profile_of_another_model_refused(tiny_models, text_file, tiny_profile, tmp_path):
    other = tiny_models("mistral")
    with pytest.raises(InputError, match="another model"):
        prune(_cfg(other, tmp_path / "ck", text_file, method="wanda", from_profile=tiny_profile,
                   target_sparsity=0.5))
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("kw,match", [
    (dict(method="prune-it", uniform=True, target_sparsity=0.5), "unknown method"),
    (dict(method="wanda", uniform=True, target_sparsity=1.0), r"\[0, 1\)"),
    (dict(method="wanda", uniform=True), "target-sparsity is required"),
    (dict(method="wanda", target_sparsity=0.5), "exactly one allocation"),
    (dict(method="wanda", uniform=True, pattern="2:3"), "M to divide"),
    (dict(method="wanda", uniform=True, pattern="5:4"), "N:M"),
])
def test_bad_input(kw, match, tiny_llama, text_file, tmp_path):
    with pytest.raises(InputError, match=match):
        prune(_cfg(tiny_llama, tmp_path / "ck", text_file, **kw))
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_llama, text_file, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method="magnitude", uniform=True, target_sparsity=0.5))
    assert (tmp_path / "ck" / "keep.txt").read_text() == "mine"
    prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method="magnitude", uniform=True, target_sparsity=0.5,
               force=True))
    assert (tmp_path / "ck" / "config.json").is_file() and not (tmp_path / "ck" / "keep.txt").exists()


def test_interrupt_leaves_no_partial_checkpoint(tiny_llama, text_file, tmp_path, monkeypatch):
    import owlctl.core.methods as methods

    calls = {"n": 0}
    real = methods.prune_weight

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # in the middle of block 1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(methods, "prune_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method="wanda", uniform=True, target_sparsity=0.5))
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_saving_leaves_nothing(tiny_llama, text_file, tmp_path, monkeypatch):
    import owlctl.formats.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_records", boom)  # after the weights, before the rename
    with pytest.raises(KeyboardInterrupt):
        prune(_cfg(tiny_llama, tmp_path / "ck", text_file, method="magnitude", uniform=True, target_sparsity=0.5))
    assert list(tmp_path.iterdir()) == []
