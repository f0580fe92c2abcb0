"""evaluate / evaluate_loaded / audit_sparsity on tiny models: audit verdicts, identical windows under
--compare, zero-shot through lm-eval on an offline task, and the errors users see."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from owlctl.engine.evaluation import zeroshot as zs
from owlctl.engine.models import load_model
from owlctl.errors import InputError
from owlctl.formats.checkpoint import read_checkpoint_records
from owlctl.ops.evaluate import EvalConfig, audit_sparsity, eval_defaults, evaluate, evaluate_loaded

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"


def _prune(tiny_llama, text_file, out, **kw):
    from owlctl.ops.prune import PruneConfig, prune

    opts = dict(method="wanda", uniform=True, target_sparsity=0.5, calib=str(text_file), nsamples=4, seqlen=32,
                device="cpu")
    opts.update(kw)
    prune(PruneConfig(model=str(tiny_llama), output=out, **opts))
    return out


@pytest.fixture(scope="module")
def pruned(tiny_llama, text_file, tmp_path_factory):
    return _prune(tiny_llama, text_file, tmp_path_factory.mktemp("ev") / "wanda50")


@pytest.fixture(scope="module")
def pruned_nm(tiny_llama, text_file, tmp_path_factory):
    return _prune(tiny_llama, text_file, tmp_path_factory.mktemp("ev") / "mag24", method="magnitude",
                  target_sparsity=None, pattern="2:4")


def _loaded(path):
    model, tok, _info = load_model(str(path))
    return model, tok, read_checkpoint_records(path)


# ------------------------------------------------------------------------------------------- audit
def test_audit_pruned_checkpoint_is_clean(pruned):
    model, _tok, rec = _loaded(pruned)
    a = audit_sparsity(model, rec)
    assert a["status"] == "ok" and a["mismatches"] == []
    assert a["realised_sparsity"] == pytest.approx(0.5) and a["allocated_sparsity"] == pytest.approx(0.5)
    assert len(a["blocks"]) == 3 and all(b["ok"] and b["check"] == "report counts" for b in a["blocks"])
    assert {r["name"] for r in a["blocks"][0]["linears"]} >= {"self_attn.q_proj", "mlp.down_proj"}


def test_audit_flags_extra_zeros(pruned):
    model, _tok, rec = _loaded(pruned)
    w = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        nz = (w != 0).nonzero()[:5]
        w[nz[:, 0], nz[:, 1]] = 0.0  # five more zeros than the checkpoint was pruned to
    a = audit_sparsity(model, rec)
    assert a["status"] == "mismatch"
    assert [(m["block"], m["linear"]) for m in a["mismatches"]] == [(1, "self_attn.q_proj")]
    assert "+5" in a["mismatches"][0]["reason"]
    assert [b["ok"] for b in a["blocks"]] == [True, False, True]


def test_audit_without_report_uses_rounding_slack(pruned):
    model, _tok, rec = _loaded(pruned)
    rec = {"allocation": rec["allocation"], "report": None}
    assert audit_sparsity(model, rec)["status"] == "ok"
    w = model.model.layers[2].mlp.down_proj.weight  # zero 20% of one matrix: far beyond 1/C_in
    with torch.no_grad():
        w[:, : w.shape[1] // 5] = 0.0
    a = audit_sparsity(model, rec)
    assert [m["block"] for m in a["mismatches"]] == [2] and a["mismatches"][0]["linear"] is None
    assert "slack" in a["mismatches"][0]["reason"]


def test_audit_nm(pruned_nm):
    model, _tok, rec = _loaded(pruned_nm)
    a = audit_sparsity(model, rec)
    assert a["status"] == "ok" and a["pattern"] == {"kind": "nm", "n_keep": 2, "m": 4}
    assert all(r["nm_violations"] == 0 for b in a["blocks"] for r in b["linears"])
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[0, :4] = 1.0  # one group of 4 now keeps 4 weights
    a = audit_sparsity(model, rec)
    reasons = [m["reason"] for m in a["mismatches"] if m["block"] == 0]
    assert any("groups of 4 keep more than 2" in r for r in reasons)


def test_audit_dense_has_no_allocation(tiny_llama):
    model, _tok, rec = _loaded(tiny_llama)
    assert rec["allocation"] is None
    a = audit_sparsity(model, rec)
    assert a["status"] == "no allocation recorded" and a["mismatches"] == []
    assert a["realised_sparsity"] == 0.0 and all(b["allocated_sparsity"] is None for b in a["blocks"])


# ------------------------------------------------------------------------------------- evaluation
def test_compare_uses_identical_windows(pruned, tiny_llama, text_file):
    doc = evaluate(EvalConfig(model=str(pruned), data=(str(text_file),), seqlen=64, max_windows=3,
                              batch_size=2, compare=str(tiny_llama), device="cpu"))
    assert doc["schema"] == "owlctl.eval/2" and doc["audit"]["status"] == "ok"
    this, other = doc["perplexity"][str(text_file)], doc["comparison"]["perplexity"][str(text_file)]
    assert this["windows"] == other["windows"] == 3
    assert this["windows_sha256"] == other["windows_sha256"] and doc["comparison"]["identical_windows"]
    assert doc["comparison"]["ratio"][str(text_file)] == pytest.approx(other["ppl"] / this["ppl"])
    assert doc["comparison"]["audit"]["status"] == "no allocation recorded"
    assert doc["model"]["pruned_from"]["id"] == str(tiny_llama)  # the checkpoint remembers its origin
    # the dense model alone on the same settings gives the same number
    alone = evaluate(EvalConfig(model=str(tiny_llama), data=(str(text_file),), seqlen=64, max_windows=3,
                                device="cpu"))
    assert alone["perplexity"][str(text_file)]["ppl"] == pytest.approx(other["ppl"], rel=1e-6)


def test_evaluate_loaded_in_process(pruned, text_file):
    model, tok, rec = _loaded(pruned)
    res = evaluate_loaded(model, tok, data=[str(text_file)], seqlen=32, max_windows=2, records=rec)
    assert set(res) == {"perplexity", "audit", "zeroshot", "seconds"}
    assert res["perplexity"][str(text_file)]["windows"] == 2 and res["audit"]["status"] == "ok"
    assert res["zeroshot"] is None
    assert next(model.parameters()).device.type == "cpu"


def test_defaults_and_bad_config(tiny_llama, text_file):
    assert eval_defaults("builtin:smollm2-135m") == (("builtin:wiki",), 512)
    assert eval_defaults("meta-llama/Llama-2-7b-hf") == (("wikitext2",), 2048)
    assert eval_defaults("x", ["c4"], 128) == (("c4",), 128)
    assert eval_defaults("x", None, None, context=512) == (("wikitext2",), 512)  # the default fits the model
    with pytest.raises(InputError, match="--split"):
        evaluate(EvalConfig(model=str(tiny_llama), split="calib"))
    with pytest.raises(InputError, match="max_position_embeddings"):  # asked for more than the 512 positions
        evaluate(EvalConfig(model=str(tiny_llama), data=(str(text_file),), seqlen=1024, device="cpu"))


# -------------------------------------------------------------------------------------- zero-shot
def test_zeroshot_offline_task(tiny_llama):
    pytest.importorskip("lm_eval")
    model, tok, rec = _loaded(tiny_llama)
    res = evaluate_loaded(model, tok, ppl=False, tasks=["owlctl_tiny"], limit=2, task_dir=str(TASK_DIR),
                          records=rec)
    z = res["zeroshot"]
    assert z["num_fewshot"] == 0 and z["lm_eval_version"]
    row = z["tasks"]["owlctl_tiny"]
    assert row["samples"] == 2 and 0.0 <= row["acc"] <= 1.0 and "acc_norm" in row
    assert z["mean_acc"] == row["acc"] and res["perplexity"] == {}


def test_unknown_task_lists_close_names(monkeypatch):
    pytest.importorskip("lm_eval")
    # stand in the small task folder for lm-eval's full index (indexing ~15k task files takes ~10 s)
    local = zs._manager(str(TASK_DIR), include_defaults=False)
    monkeypatch.setitem(zs._MANAGERS, (str(TASK_DIR), True), local)
    with pytest.raises(InputError) as e:
        zs.task_manager(["owlctl_tiy"], TASK_DIR)
    assert "owlctl_tiy" in e.value.message and "owlctl_tiny" in e.value.message
    assert "boolq" in e.value.hint


def test_missing_lm_eval_gives_install_hint(monkeypatch, tiny_llama):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(InputError) as e:
        evaluate(EvalConfig(model=str(tiny_llama), tasks=("paper",), ppl=False))
    assert "owlctl[eval]" in e.value.hint


def test_compare_refuses_another_tokenizer(tiny_llama, text_file, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(InputError, match="same tokenizer"):
        evaluate(EvalConfig(model=str(tiny_llama), data=(str(text_file),), seqlen=64, compare=str(other),
                            device="cpu"))
