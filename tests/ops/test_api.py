"""The in-memory API: ``owlctl.prune_model(model, tokenizer, ...)`` prunes a model the user holds, exactly as
the file-based ``prune`` does the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import owlctl
from owlctl.ops.prune import PruneConfig, prune


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("method, kw", [("wanda", {"target_sparsity": 0.5}), ("sparsegpt", {"target_sparsity": 0.4}),
                                        ("magnitude", {"pattern": "2:4"})])
def test_prune_model_equals_the_prune_command(method, kw, tiny_llama, text_file, tmp_path):
    model, tok = _load(tiny_llama)
    report = owlctl.prune_model(model, tok, method=method, calib=str(text_file), nsamples=4, seqlen=32, **kw)
    assert report["schema"] == "owlctl.report/2" and report["command"] == "api"
    prune(PruneConfig(model=str(tiny_llama), output=tmp_path / "ck", method=method, uniform=True, calib=str(text_file),
                      nsamples=4, seqlen=32, device="cpu", **kw))
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.state_dict().items(), on_disk.state_dict().items()):
        assert torch.equal(a, b), name
    assert report["realised_sparsity"] == pytest.approx(0.5 if "pattern" in kw else kw["target_sparsity"], abs=0.01)


def test_prune_model_owl_profiles_in_memory(tiny_llama, text_file):
    model, tok = _load(tiny_llama)
    report = owlctl.prune_model(model, tok, method="wanda", target_sparsity=0.6, allocator="owl", lam=0.1,
                                calib=str(text_file), nsamples=4, seqlen=32)
    block = [b["realised_sparsity"] for b in report["blocks"]]
    assert max(block) - min(block) > 0.05  # OWL gave the blocks different sparsities
    assert sum(b["numel"] * b["realised_sparsity"] for b in report["blocks"]) / sum(
        b["numel"] for b in report["blocks"]) == pytest.approx(0.6, abs=0.02)


def test_profile_model_leaves_the_weights(tiny_llama, text_file):
    model, tok = _load(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    doc = owlctl.profile_model(model, tok, calib=str(text_file), nsamples=2, seqlen=16)
    assert doc["schema"] == "owlctl.profile/2" and len(doc["blocks"]) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
