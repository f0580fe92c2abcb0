"""Every command's --json output, and every file owlctl writes, validates against its JSON Schema in
docs/schemas/ (generated from formats/documents.py) and carries the one envelope: schema, owlctl_version,
created, command, model (one shape), seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

jsonschema = pytest.importorskip("jsonschema")
runner = CliRunner()
SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
ENVELOPE = ("schema", "owlctl_version", "created", "command", "model", "seconds")


def check(doc: dict, kind: str, command: str) -> None:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    jsonschema.validate(doc, schema)
    assert list(doc)[:len(ENVELOPE)] == list(ENVELOPE), list(doc)[:8]
    assert doc["schema"] == schema["title"] and doc["command"] == command
    if doc["model"] is not None:
        assert set(doc["model"]) >= {"id", "spec", "content_sha256", "model_type"}


@pytest.fixture(scope="module")
def run(tiny_llama, text_file, tmp_path_factory):
    """Runs every command once on a tiny model; returns {name: (stdout document, output dir)}."""
    d = tmp_path_factory.mktemp("docs")
    cal = ["--calib", str(text_file), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]

    def go(*args: object) -> dict:
        r = runner.invoke(app, [str(a) for a in args] + ["--json"])
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)

    out = {"profile": go("profile", tiny_llama, "-o", d / "p.json", "--outlier-m", "3,5", *cal)}
    out["allocate"] = go("allocate", d / "p.json", "-s", "0.5", "-m", "5", "-o", d / "a.json")
    out["prune"] = go("prune", tiny_llama, "--allocation", d / "a.json", "-o", d / "ck", *cal)
    out["nm"] = go("nm", tiny_llama, "--pattern", "2:4", "-o", d / "nm", *cal)
    out["eval"] = go("eval", d / "ck", "--data", text_file, "--seqlen", "16", "--max-windows", "2", "--device",
                     "cpu", "--compare", tiny_llama)
    out["export packed"] = go("export", d / "ck", "--format", "packed", "-o", d / "pk")
    out["export onnx"] = go("export", d / "ck", "--format", "onnx", "-o", d / "ox", "--no-kv-cache")
    out["bench"] = go("bench", d / "ck", "--backend", "torch-sparse", "--prompt-len", "8", "--new-tokens", "2",
                      "--warmup", "0")
    out["pipeline"] = go("pipeline", tiny_llama, *cal, "--eval-data", text_file, "--eval-seqlen", "16",
                         "--max-windows", "2", "-o", d / "run", "--save-checkpoints")
    out["finetune"] = go("finetune", d / "ck", "-o", d / "ft", "--data", text_file, "--steps", "1",
                         "--batch-size", "1", "--effective-batch", "1", "--block-size", "16", "--eval-windows", "1",
                         "--device", "cpu")
    return out, d


@pytest.mark.parametrize("name, kind, command", [
    ("profile", "profile", "profile"), ("allocate", "allocation", "allocate"), ("prune", "prune", "prune"),
    ("nm", "prune", "nm"), ("eval", "eval", "eval"), ("export packed", "export", "export"),
    ("export onnx", "export", "export"), ("bench", "bench", "bench"), ("pipeline", "pipeline", "pipeline"),
    ("finetune", "finetune", "finetune")])
def test_every_json_output_validates(run, name, kind, command):
    docs, _ = run
    check(docs[name], kind, command)


@pytest.mark.parametrize("path, kind, command", [
    ("p.json", "profile", "profile"), ("a.json", "allocation", "allocate"),
    ("ck/owlctl-report.json", "report", "prune"), ("ck/allocation.json", "allocation", "allocate"),
    ("nm/owlctl-report.json", "report", "nm"), ("nm/allocation.json", "allocation", "prune"),
    ("pk/packed.json", "packed", "export"), ("ox/onnx-export.json", "export", "export"),
    ("run/profile.json", "profile", "pipeline"), ("run/allocation-owl.json", "allocation", "pipeline"),
    ("run/pipeline.json", "pipeline", "pipeline"), ("run/wanda-owl/owlctl-report.json", "report", "pipeline"),
    ("ft/owlctl-report.json", "report", "prune")])
def test_every_written_file_validates(run, path, kind, command):
    _, d = run
    check(json.loads((d / path).read_text()), kind, command)


def test_one_model_shape_and_one_name_per_concept(run):
    docs, _ = run
    prune, ev = docs["prune"], docs["eval"]
    assert prune["model"]["id"] == ev["model"]["pruned_from"]["id"]  # the checkpoint remembers its origin
    for key in ("target_sparsity", "allocated_sparsity", "realised_sparsity"):
        assert isinstance(prune[key], float)
    assert "comparison" in ev and "compare" not in ev
    p = ev["perplexity"]
    row = docs["pipeline"]["results"][0]["perplexity"]
    assert set(next(iter(p.values()))) == set(next(iter(row.values())))  # perplexity has one shape everywhere
    assert "packed_sparsity" not in json.dumps(docs["export packed"])
