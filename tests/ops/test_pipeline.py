"""`owlctl pipeline` on a tiny model: one load, dense / uniform / OWL rows, files in the output folder."""

import json

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()


def test_pipeline_tiny(tiny_llama, text_file, tmp_path):
    args = ["pipeline", str(tiny_llama), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval-data", str(text_file), "--eval-seqlen", "32", "--max-windows", "6", "--device", "cpu",
            "-s", "0.6", "-l", "0.1", "-o", str(tmp_path / "run"), "--save-checkpoints", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "owlctl.pipeline/2"
    variants = [row["variant"] for row in doc["results"]]
    assert variants == ["dense", "wanda uniform", "wanda owl"]
    for row in doc["results"][1:]:
        assert row["realised_sparsity"] == pytest.approx(0.6, abs=0.02)
        assert row["perplexity"][str(text_file)]["windows"] == 6
    owl = doc["results"][2]
    assert owl["block_sparsity_max"] > owl["block_sparsity_min"]  # OWL is not uniform
    run = tmp_path / "run"
    for name in ("profile.json", "allocation-owl.json", "allocation-uniform.json", "pipeline.json"):
        assert (run / name).is_file()
    assert (run / "wanda-owl" / "model.safetensors").is_file()
    # the same folder again needs --force
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--force" in r.stderr


def test_pipeline_bad_method(tiny_llama):
    r = runner.invoke(app, ["pipeline", str(tiny_llama), "--method", "random"])
    assert r.exit_code == 2 and "'random' is not one of" in r.stderr
