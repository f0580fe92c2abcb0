"""`owlctl export` and `owlctl bench` through the Typer app: exit codes, one JSON document, hints on stderr."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pruned70(pruned_tiny):
    return pruned_tiny(0.7)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path_factory.getbasetemp() / "owlctl-cache-cli"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_export_packed_json_and_table(pruned70, tmp_path):
    r = invoke("export", pruned70, "--format", "packed", "-o", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one document
    assert doc["schema"] == "owlctl.export/1" and doc["packed"]["size_ratio"] < 1
    r = invoke("export", pruned70, "--format", "packed", "-o", tmp_path / "p")
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    r = invoke("export", pruned70, "--format", "packed", "-o", tmp_path / "p", "--force")
    assert r.exit_code == 0 and "packed" in r.stdout and "MiB" in r.stdout


def test_export_onnx_json(pruned70, tmp_path):
    r = invoke("export", pruned70, "--format", "onnx", "--no-kv-cache", "-o", tmp_path / "o", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["onnx"]["graph"]["kv_cache"] is False and doc["onnx"]["verification"]["max_abs_diff"] < 1e-4
    assert r.stderr == ""


def test_export_unsupported_architecture_exit_1(pruned70, tmp_path, monkeypatch):
    import torch

    def boom(*a, **k):
        raise NotImplementedError("aten::weird_op is not supported")

    monkeypatch.setattr(torch.onnx, "export", boom)
    r = invoke("export", pruned70, "--format", "onnx", "-o", tmp_path / "o")
    assert r.exit_code == 1
    assert "ONNX export" in r.stderr and "weird_op" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and not (tmp_path / "o").exists()


def test_export_bad_format(pruned70, tmp_path):
    r = invoke("export", pruned70, "--format", "gguf", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "'gguf' is not one of 'onnx', 'packed'" in r.stderr


def test_bench_json_is_one_document(pruned70):
    r = invoke("bench", pruned70, "--backend", "torch-sparse", "--prompt-len", 8, "--new-tokens", 3, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "owlctl.bench/2" and len(doc["rows"]) == 2
    assert doc["settings"]["torch_num_threads"] == 1


def test_bench_table(pruned70):
    r = invoke("bench", pruned70, "--prompt-len", 8, "--new-tokens", 3)
    assert r.exit_code == 0, r.stderr
    assert "decode" in r.stdout and "p99" in r.stdout
    assert "Linear GB/s (of probe)" in r.stdout and "read bandwidth" in r.stdout


def test_bench_deepsparse_missing_exit_1_with_setup_hint(pruned70):
    r = invoke("bench", pruned70, "--cpu", "--prompt-len", 8, "--new-tokens", 3)
    assert r.exit_code == 1
    assert "DeepSparse is not installed" in r.stderr and "owlctl bench --cpu --setup" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bench_beyond_context_exit_1(pruned70):
    r = invoke("bench", pruned70, "--prompt-len", 500, "--new-tokens", 100)
    assert r.exit_code == 1 and "exceeds the context" in r.stderr and "512" in r.stderr


def test_bench_runs_below_three_is_a_usage_error(pruned70):
    r = invoke("bench", pruned70, "--runs", "2")
    assert r.exit_code == 2 and "--runs" in r.stderr and "x>=3" in r.stderr


@pytest.mark.parametrize("args,msg", [(["--cpu", "--backend", "onnxruntime"], "conflicts"),
                                      (["--setup"], "--setup prepares DeepSparse")])
def test_bench_bad_options(pruned70, args, msg):
    r = invoke("bench", pruned70, *args)
    assert r.exit_code == 1 and msg in r.stderr


def test_bench_requires_model():
    r = invoke("bench")
    assert r.exit_code == 1 and "MODEL is required" in r.stderr
