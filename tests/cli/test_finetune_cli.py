"""`owlctl finetune` through the real Typer app, and once under `accelerate launch`: exit codes, one JSON
document on stdout, warnings and errors on stderr, no partial output on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()
FAST = ["--steps", "2", "--batch-size", "2", "--effective-batch", "4", "--block-size", "32", "--eval-windows", "2",
        "--lr", "1e-2", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; avoids OpenMP spinning on a loaded machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    return pruned_tiny(0.5)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def no_partial(parent: Path) -> bool:
    return not any(".partial-" in p.name for p in parent.iterdir())


def test_json_is_one_document_and_logs_stay_off_stdout(pruned, text_file, tmp_path):
    out = tmp_path / "out"
    r = invoke("finetune", pruned, "-o", out, "--data", text_file, *FAST, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one document
    assert doc["mode"] == "merge-mask" and doc["output"] == str(out)
    assert doc["training"]["steps"] == 2 and len(doc["training"]["loss_curve"]) == 2
    assert doc["eval"]["before"]["perplexity"] > 0 and doc["eval"]["after"]["loss"] > 0
    assert 0 < doc["delta_removed"]["overall"] < 1
    assert doc["sparsity"]["zeros_kept"] and (out / "model.safetensors").is_file()
    assert not any(k.startswith("_") for k in doc)


def test_table_summary(pruned, text_file, tmp_path):
    r = invoke("finetune", pruned, "-o", tmp_path / "out", "--data", text_file, *FAST,
               "--keep-sparsity", "masked-lora", "--targets", "all-linear", "--gradient-checkpointing")
    assert r.exit_code == 0, r.stderr
    for needle in ("masked-lora", "eval before", "eval after (saved)", "delta removed by mask", "tokens/s"):
        assert needle in r.stdout


def test_existing_output_needs_force(pruned, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("finetune", pruned, "-o", out, "--data", text_file, *FAST)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    r = invoke("finetune", pruned, "-o", out, "--data", text_file, *FAST, "--force", "--adapter-only", "-q")
    assert r.exit_code == 0, r.stderr
    assert (out / "adapter_config.json").is_file()


def test_steps_zero_is_a_usage_error(pruned, text_file, tmp_path):
    r = invoke("finetune", pruned, "-o", tmp_path / "out", "--data", text_file, *FAST, "--steps", "0")
    assert r.exit_code == 2 and "--steps" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (["--targets", "wq_proj"], "wq_proj"),
    (["--keep-sparsity", "masked-lora", "--adapter-only"], "adapter-only"),
])
def test_bad_inputs_exit_1_without_output(pruned, text_file, tmp_path, args, needle):
    out = tmp_path / "out"
    r = invoke("finetune", pruned, "-o", out, "--data", text_file, *FAST, *args)
    assert r.exit_code == 1, r.stdout
    assert "error:" in r.stderr and needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not out.exists() and no_partial(tmp_path)


def test_missing_checkpoint(text_file, tmp_path):
    r = invoke("finetune", tmp_path / "nowhere", "-o", tmp_path / "out", "--data", text_file, *FAST)
    assert r.exit_code == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


def test_dense_model_warns_on_stderr(tiny_llama, text_file, tmp_path):
    r = invoke("finetune", tiny_llama, "-o", tmp_path / "out", "--data", text_file, *FAST,
               "--keep-sparsity", "masked-lora", "--json")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "nothing to keep" in r.stderr
    assert json.loads(r.stdout)["warnings"]
    r = invoke("finetune", tiny_llama, "-o", tmp_path / "out2", "--data", text_file, *FAST)
    assert r.exit_code == 1 and "no mask to re-apply" in r.stderr


def test_help_lists_the_options():
    r = invoke("finetune", "--help")
    assert r.exit_code == 0
    for flag in ("--keep-sparsity", "--adapter-only", "--targets", "--effective-batch", "--gradient-checkpointing",
                 "accelerate launch"):
        assert flag in r.stdout


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_runs_under_accelerate_launch(pruned, text_file, tmp_path):
    """The same command, unchanged, under `accelerate launch` (one CPU process here; DDP is the same loop)."""
    exe = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "owlctl", "finetune",
                           str(pruned), "-o", str(out), "--data", str(text_file), *FAST, "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["training"]["processes"] == 1 and doc["training"]["steps"] == 2
    assert (out / "model.safetensors").is_file()


def test_block_size_defaults_to_the_model_context(pruned, text_file, tmp_path):
    """A 512-position model: the default block size is min(1024, 512), with a note, not an error."""
    r = invoke("finetune", pruned, "-o", tmp_path / "ft", "--data", text_file, "--steps", "1", "--batch-size", "1",
               "--effective-batch", "1", "--eval-windows", "0", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["training"]["block_size"] == 512
    assert "--block-size defaults to 512" in r.stderr
