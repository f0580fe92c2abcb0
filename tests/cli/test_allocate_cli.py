"""`owlctl allocate` through the real Typer app: exit codes, stdout/stderr separation, files, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()

# 4 blocks of 1000 weights; M=5 -> D = 1, 2, 3, 2 %; M=6 -> 0.1, 0.2, 0.3, 0.2 %
COUNTS = {"3": [40, 50, 90, 60], "5": [10, 20, 30, 20], "6": [1, 2, 3, 2]}


def profile_doc() -> dict:
    blocks = [{"index": i, "name": f"model.layers.{i}", "numel": 1000, "mean_score": 0.5, "score_sum": 500.0,
               "outlier_count": {k: v[i] for k, v in COUNTS.items()},
               "outlier_pct": {k: v[i] / 10 for k, v in COUNTS.items()},
               "linears": [{"name": "mlp.down_proj", "shape": [20, 50], "numel": 1000, "score_sum": 500.0,
                            "max_score": 9.0, "outlier_count": {k: v[i] for k, v in COUNTS.items()}}]}
              for i in range(4)]
    return {"schema": "owlctl.profile/1", "owlctl_version": "0.1.0", "created": "2024-01-01T00:00:00+00:00",
            "model": {"id": "tiny/llama", "model_type": "llama", "family": "llama", "revision": None,
                      "content_sha256": "ab" * 32, "num_blocks": 4},
            "calibration": {"source": "builtin:wiki", "nsamples": 4, "seqlen": 16, "seed": 0,
                            "tokens_sha256": "cd" * 32},
            "score": {"name": "wanda", "definition": "|W| * ||X||", "outlier_rule": "score > M * block mean (strict)",
                      "pct_units": "percent"},
            "outlier_m": [3.0, 5.0, 6.0], "blocks": blocks}


@pytest.fixture
def prof(tmp_path):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(profile_doc()))
    return p


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_json_output_is_one_document(prof):
    r = invoke("allocate", prof, "-s", 0.7, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "owlctl.allocation/2"
    assert [b["sparsity"] for b in doc["blocks"]] == pytest.approx([0.78, 0.70, 0.62, 0.70], abs=1e-12)
    assert doc["params"]["outlier_m"] == 5.0 and doc["params"]["lambda"] == 0.08  # the paper's defaults
    assert doc["drift"] == pytest.approx(0.0, abs=1e-12)
    assert len(doc["profile"]["sha256"]) == 64
    assert r.stderr == ""


def test_writes_output_and_logs_to_stderr(prof, tmp_path):
    out = tmp_path / "allocation.json"
    r = invoke("allocate", prof, "-s", 0.6, "-m", 3, "-l", 0.05, "-o", out)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["params"]["target_sparsity"] == 0.6 and doc["params"]["outlier_m"] == 3.0
    assert "wrote" in r.stderr and "wrote" not in r.stdout
    assert "0.6000" in r.stdout and "target" in r.stdout  # the table
    rq = invoke("allocate", prof, "-s", 0.6, "-o", tmp_path / "b.json", "-q")
    assert rq.exit_code == 0 and rq.stderr == ""


def test_mixed_nm(prof):
    r = invoke("allocate", prof, "--pattern", "3:8", "-m", 6, "-l", 2, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [b["n_keep"] for b in doc["blocks"]] == [2, 3, 4, 3]
    assert doc["pattern"] == {"kind": "nm", "n_keep": 3, "m": 8}
    table = invoke("allocate", prof, "--pattern", "3:8")  # N:M defaults M 6, lambda 2
    assert table.exit_code == 0 and "4:8" in table.stdout and "2:8" in table.stdout


def test_uniform_and_balance(prof):
    r = invoke("allocate", prof, "-s", 0.5, "--allocator", "uniform", "--json")
    assert [b["sparsity"] for b in json.loads(r.stdout)["blocks"]] == [0.5] * 4
    r = invoke("allocate", prof, "-s", 0.5, "--balance", "params", "--clamp", "reference", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["params"]["balance"] == "params"


@pytest.mark.parametrize("args, message", [
    (["-s", "1.0"], "fraction in [0, 1)"),
    (["-s", "0.7", "-l", "-0.1"], "--lambda must be >= 0"),
    (["--pattern", "5:4"], "N must be in [0, M]"),
    (["--pattern", "x:4"], "integers"),
    (["-s", "0.7", "-m", "4"], "M = 4 was not profiled"),
    ([], "--target-sparsity is required"),
    (["-s", "0.7", "--special"], "--special applies to mixed N:M only"),
    (["-s", "0.7", "--pattern", "2:4"], "conflicts with --pattern 2:4"),
    (["-s", "0.995"], "outside [--min-sparsity"),
    (["-s", "0.7", "--plot", "fig.gif"], "figure format"),
])
def test_bad_input_exit_1_without_traceback(prof, tmp_path, args, message):
    out = tmp_path / "allocation.json"
    r = invoke("allocate", prof, "-o", out, *args)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "error:" in r.stderr and message in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert not out.exists()


def test_pattern_hint_explains_notation(prof):
    r = invoke("allocate", prof, "--pattern", "5:4")
    assert "KEPT" in r.stderr


def test_missing_and_malformed_profile(tmp_path):
    r = invoke("allocate", tmp_path / "nope.json", "-s", 0.7)
    assert r.exit_code == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    doc = profile_doc()
    del doc["blocks"][2]["outlier_count"]
    bad.write_text(json.dumps(doc))
    r = invoke("allocate", bad, "-s", 0.7)
    assert r.exit_code == 1 and "blocks[2].outlier_count is missing" in r.stderr
    assert "owlctl profile" in r.stderr


def test_existing_output_needs_force(prof, tmp_path):
    out = tmp_path / "allocation.json"
    out.write_text("precious")
    r = invoke("allocate", prof, "-s", 0.7, "-o", out)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_text() == "precious"
    r = invoke("allocate", prof, "-s", 0.7, "-o", out, "--force")
    assert r.exit_code == 0 and json.loads(out.read_text())["schema"] == "owlctl.allocation/2"


def test_usage_error_is_exit_2(prof):
    r = invoke("allocate", prof, "-s", 0.7, "--clamp", "sideways")
    assert r.exit_code == 2


def test_plot_writes_png(prof, tmp_path):
    fig = tmp_path / "owl.png"
    r = invoke("allocate", prof, "-s", 0.7, "--plot", fig)
    assert r.exit_code == 0, r.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = invoke("allocate", prof, "--pattern", "3:8", "--plot", fig)  # exists, no --force
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = invoke("allocate", prof, "--pattern", "3:8", "--plot", fig, "--force")
    assert r.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["owl.png", "profile.json"]


def test_plot_without_matplotlib_gives_install_hint(prof, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "allocation.json"
    r = invoke("allocate", prof, "-s", 0.7, "-o", out, "--plot", tmp_path / "f.png")
    assert r.exit_code == 1 and "owlctl[plot]" in r.stderr
    assert not out.exists()


def test_help():
    r = invoke("--help")
    assert r.exit_code == 0 and "allocate" in r.stdout
    r = invoke("allocate", "--help")
    assert r.exit_code == 0 and "Examples" in r.stdout and "owlctl allocate profile.json" in r.stdout


def test_allocate_never_imports_torch(prof):
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from owlctl.cli.main import app\n"
        f"r = CliRunner().invoke(app, ['allocate', {str(prof)!r}, '-s', '0.7', '--json'])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'numpy')}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"torch": False, "transformers": False, "numpy": False}
