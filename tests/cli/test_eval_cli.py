"""`owlctl eval` through the real Typer app: one JSON document on stdout, tables for people, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()
TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def ckpt(tiny_llama, text_file, tmp_path_factory):
    from owlctl.ops.prune import PruneConfig, prune

    out = tmp_path_factory.mktemp("evcli") / "wanda50"
    prune(PruneConfig(model=str(tiny_llama), output=out, method="wanda", uniform=True, target_sparsity=0.5,
                      calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    return out


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_json_is_one_document(ckpt, tiny_llama, text_file):
    r = _eval(ckpt, "--data", text_file, "--seqlen", 64, "--max-windows", 2, "--device", "cpu",
              "--compare", tiny_llama, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is one document
    assert doc["schema"] == "owlctl.eval/2" and doc["owlctl_version"]
    assert set(doc) >= {"created", "command", "model", "perplexity", "audit", "zeroshot", "comparison", "seconds"}
    assert doc["perplexity"][str(text_file)]["windows"] == 2
    assert doc["comparison"]["identical_windows"] and doc["audit"]["status"] == "ok"
    assert "evaluating" in r.stderr  # logs go to stderr


def test_tables_for_people(ckpt, text_file):
    r = _eval(ckpt, "--data", text_file, "--seqlen", 64, "--max-windows", 2, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "perplexity" in r.stdout and "sparsity audit" in r.stdout and "ok" in r.stdout
    assert "mismatch" not in r.stdout.lower()


def test_quiet_keeps_stderr_empty(ckpt, text_file):
    r = _eval(ckpt, "--data", text_file, "--seqlen", 64, "--max-windows", 1, "--device", "cpu", "--json", "-q")
    assert r.exit_code == 0 and r.stderr == ""
    json.loads(r.stdout)


@pytest.mark.parametrize("args, needle", [
    (["--seqlen", "100000"], "--seqlen"),  # > the corpus and > max positions
    (["--data", "/no/such/file.txt"], "neither a known corpus"),
])
def test_bad_inputs_exit_1(ckpt, text_file, args, needle):
    r = _eval(ckpt, "--device", "cpu", "--data", text_file, "--seqlen", 64, *args)  # later options win
    assert r.exit_code == 1 and r.stdout == ""
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--split", "calib"], "--split"),
    (["--max-windows", "0"], "--max-windows"),
])
def test_usage_errors_exit_2(ckpt, text_file, args, needle):
    r = _eval(ckpt, "--device", "cpu", "--data", text_file, "--seqlen", 64, *args)
    assert r.exit_code == 2 and r.stdout == ""
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_too_short_corpus(ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    r = _eval(ckpt, "--data", short, "--seqlen", 64, "--device", "cpu")
    assert r.exit_code == 1 and "fewer than one window" in r.stderr and "lower --seqlen" in r.stderr


def test_zeroshot_offline(ckpt):
    pytest.importorskip("lm_eval")
    r = _eval(ckpt, "--no-ppl", "--tasks", "owlctl_tiny", "--task-dir", TASK_DIR, "--limit", 2, "--device", "cpu",
              "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["perplexity"] == {} and doc["zeroshot"]["tasks"]["owlctl_tiny"]["samples"] == 2
    assert "loglikelihood" not in r.stderr  # no bars when stderr is not a terminal, not even lm-eval's


def test_unknown_task_exit_1(ckpt, monkeypatch):
    pytest.importorskip("lm_eval")
    from owlctl.engine.evaluation import zeroshot as zs

    monkeypatch.setitem(zs._MANAGERS, (str(TASK_DIR), True), zs._manager(str(TASK_DIR), include_defaults=False))
    r = _eval(ckpt, "--tasks", "owlctl_tny", "--task-dir", TASK_DIR, "--device", "cpu")
    assert r.exit_code == 1 and "unknown lm-eval task 'owlctl_tny'" in r.stderr and "owlctl_tiny" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_lm_eval_hint(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    r = _eval(ckpt, "--zeroshot", "--device", "cpu")
    assert r.exit_code == 1 and "pip install 'owlctl[eval]'" in r.stderr


def test_help_has_examples():
    r = runner.invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.stdout and "--compare" in r.stdout
