"""`owlctl bench` and the sparse CPU kernels: correct logits, well-formed documents (never speed)."""

from __future__ import annotations

import pytest
import torch

from owlctl.deploy.kernels import build
from owlctl.deploy.kernels import linear as kl
from owlctl.deploy.kernels.semi_structured import is_two_four
from owlctl.engine.models import load_model
from owlctl.errors import InputError, ModelError
from owlctl.ops.bench import BenchConfig, bench


@pytest.fixture(scope="module")
def pruned70(pruned_tiny):
    return pruned_tiny(0.7)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # ONNX exports, compiled kernels and the (absent) DeepSparse venv live in a per-session cache
    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path_factory.getbasetemp() / "owlctl-cache"))


def _kernels():
    ks = ["csr", "torch-csr", "torch-bsr"]
    if build.available()[0]:
        ks.insert(0, "bitmask")
    return ks


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("shape,bias", [((48, 64), False), ((37, 50), True), ((64, 128), False)])
def test_sparse_linear_matches_dense(kernel, shape, bias):
    torch.manual_seed(0)
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out_f, in_f) > 0.7)
        lin.weight[0] = 0  # an empty row
    sl = kl.sparse_linear(lin, kernel)
    assert sl.nnz == int(torch.count_nonzero(lin.weight))
    for tokens in ((1, 1), (1, 5), (3, 17), (1, 150)):  # decode (one vector), several tokens, several tiles
        x = torch.randn(*tokens, in_f)
        with torch.inference_mode():
            assert (sl(x) - lin(x)).abs().max() < 1e-5


def test_resolve_kernel_rejects_unknown():
    with pytest.raises(InputError, match="unknown sparse kernel"):
        kl.resolve_kernel("magic")


def test_two_four_pattern_check():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]])
    assert is_two_four(w)
    assert not is_two_four(torch.ones(1, 8))


def test_sparsified_model_logits_equal_dense(pruned70):
    from owlctl.deploy.runtimes.torch import torch_generate
    from owlctl.engine.models import load_model

    dense, _, _ = load_model(str(pruned70))
    sparse, _, _ = load_model(str(pruned70))
    info = kl.sparsify(sparse, "auto")
    assert info["swapped"] == 3 * 7 and info["sparse_bytes"] < info["dense_bytes"]
    ids = torch.randint(0, 260, (2, 12))
    with torch.inference_mode():
        assert (sparse(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() < 1e-4
    a = torch_generate(dense, ids[:1], 5, "cpu")
    b = torch_generate(sparse, ids[:1], 5, "cpu")
    assert (a["first_logits"] - b["first_logits"]).abs().max() < 1e-4


def _check_doc(doc, n_rows):
    assert doc["schema"] == "owlctl.bench/2" and doc["owlctl_version"]
    s = doc["settings"]
    assert s["threads"] == 1 and s["torch_num_threads"] == 1 and s["runs"] == 3
    assert doc["host"]["cpu"]["logical_cpus"] >= 1
    assert len(doc["rows"]) == n_rows
    for r in doc["rows"]:
        assert set(r) >= {"label", "model", "backend", "prefill", "decode", "memory", "max_abs_diff_vs_torch"}
        assert r["prefill"]["tokens"] == 8 and r["prefill"]["tokens_per_s"] > 0
        assert len(r["prefill"]["seconds"]) == 3
        assert r["decode"]["steps"] == 3 and r["decode"]["tokens_per_s"] > 0
        assert len(r["decode"]["tokens_per_s_runs"]) == 3
        ms = r["decode"]["step_ms"]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"]
        assert r["memory"]["peak_rss_mb"] > 0
        assert r["max_abs_diff_vs_torch"] is not None and r["max_abs_diff_vs_torch"] < 1e-4
    import json

    json.dumps(doc, allow_nan=False)  # serialisable, no NaN


def _cfg(model, **kw):
    return BenchConfig(model=str(model), prompt_len=8, new_tokens=3, runs=3, warmup=1, **kw)


def test_bench_torch(pruned70, tiny_llama):
    doc = bench(_cfg(tiny_llama, sparse=str(pruned70)))
    _check_doc(doc, 2)
    assert [r["label"] for r in doc["rows"]] == ["dense", "sparse"]
    assert doc["rows"][1]["model"]["prunable_sparsity"] == pytest.approx(0.7, abs=0.02)
    assert doc["comparison"]["decode_speedup"] > 0


def test_bench_torch_sparse(pruned70):
    doc = bench(_cfg(pruned70, backend="torch-sparse"))
    _check_doc(doc, 2)
    dense, sparse = doc["rows"]
    assert (dense["backend"], sparse["backend"]) == ("torch", "torch-sparse")
    assert sparse["kernel"] in ("bitmask", "csr", "torch-csr")
    assert sparse["memory"]["weights_mb"] < dense["memory"]["weights_mb"]
    assert set(doc["comparison"]) >= {"decode_speedup", "prefill_speedup"}


def test_bench_bandwidth_bytes_and_probe(pruned70):
    """Dense rows read every prunable weight, sparse rows the bytes sparsify stored; the probe is measured once
    and each row's GB/s is a fraction of it."""
    doc = bench(_cfg(pruned70, backend="torch-sparse"))
    dense, sparse = (r["bandwidth"] for r in doc["rows"])
    lin = [m for b in load_model(str(pruned70))[0].model.layers for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert dense["linear_bytes_per_step"] == sum(m.weight.numel() * 4 for m in lin)
    assert sparse["linear_bytes_per_step"] == doc["rows"][1]["details"]["sparse"]["sparse_bytes"]
    assert sparse["linear_bytes_per_step"] < 0.5 * dense["linear_bytes_per_step"]
    assert dense["model_bytes_per_step"] > dense["linear_bytes_per_step"]
    probe = doc["read_bandwidth"]
    if build.available()[0]:
        assert probe["gb_per_s"] > 0 and probe["threads"] == 1
        for b in (dense, sparse):
            assert b["linear_fraction_of_probe"] == pytest.approx(b["linear_gb_per_s"] / probe["gb_per_s"])
            assert b["linear_gb_per_s"] == pytest.approx(b["linear_bytes_per_step"] / b["step_seconds"] / 1e9)
    assert bench(_cfg(pruned70, probe=False))["read_bandwidth"] is None


def test_bench_onnxruntime(pruned70):
    doc = bench(_cfg(pruned70, backend="onnxruntime"))
    _check_doc(doc, 1)
    r = doc["rows"][0]
    assert r["backend"] == "onnxruntime" and r["details"]["export_max_abs_diff"] < 1e-4
    again = bench(_cfg(pruned70, backend="onnxruntime"))  # the cached export is reused
    assert again["rows"][0]["details"]["onnx_dir"] == r["details"]["onnx_dir"]


def test_bench_accepts_packed_dir(pruned70, tmp_path):
    from owlctl.ops.export import ExportConfig, export

    out = tmp_path / "packed"
    export(ExportConfig(checkpoint=str(pruned70), output=out, format="packed"))
    doc = bench(_cfg(out, backend="torch-sparse"))
    _check_doc(doc, 2)


def test_sequence_beyond_context_is_an_input_error(pruned70):
    with pytest.raises(InputError, match="exceeds the context"):
        bench(BenchConfig(model=str(pruned70), prompt_len=500, new_tokens=20))


@pytest.mark.parametrize("kw,msg", [({"runs": 2}, "--runs must be >= 3"), ({"backend": "tvm"}, "unknown backend"),
                                    ({"new_tokens": 0}, ">= 1")])
def test_bad_settings(pruned70, kw, msg):
    with pytest.raises(InputError, match=msg):
        bench(BenchConfig(model=str(pruned70), **kw))


def test_deepsparse_missing_gives_setup_hint(pruned70):
    with pytest.raises(ModelError) as e:
        bench(_cfg(pruned70, backend="deepsparse"))
    assert "not installed" in e.value.message and "owlctl bench --cpu --setup" in e.value.hint


def test_deepsparse_needs_avx2(pruned70, monkeypatch):
    from owlctl.deploy.eol import deepsparse_host

    monkeypatch.setattr(deepsparse_host, "cpu_info", lambda: {"avx2": False, "avx512f": False})
    with pytest.raises(ModelError, match="AVX2"):
        bench(_cfg(pruned70, backend="deepsparse"))
