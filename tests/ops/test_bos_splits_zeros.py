"""BOS per window recorded through profile -> prune -> eval; eval refuses text the checkpoint was calibrated on;
zeros the weights had before pruning are reported apart from the pruned ones."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from owlctl.cli.main import app
from owlctl.errors import DataError, OwlctlWarning
from owlctl.ops.evaluate import EvalConfig, evaluate
from owlctl.ops.profile import ProfileConfig, profile
from owlctl.ops.prune import PruneConfig, prune

runner = CliRunner()
CAL = dict(nsamples=4, seqlen=32, device="cpu")


# ------------------------------------------------------------------------------------------- BOS
def test_bos_setting_round_trips(tiny_llama_bos, text_file, tmp_path):
    prof = tmp_path / "p.json"
    profile(ProfileConfig(model=str(tiny_llama_bos), output=prof, calib=str(text_file), **CAL))
    pcal = json.loads(prof.read_text())["calibration"]
    assert (pcal["bos"], pcal["bos_requested"]) == ("always", "auto")  # the tokenizer adds BOS: auto -> always
    ck = tmp_path / "ck"
    prune(PruneConfig(model=str(tiny_llama_bos), output=ck, method="wanda", from_profile=prof, target_sparsity=0.5,
                      calib=str(text_file), **CAL))
    report = json.loads((ck / "owlctl-report.json").read_text())
    alloc = json.loads((ck / "allocation.json").read_text())
    assert report["calibration"]["bos"] == "always" and alloc["profile"]["calibration"]["bos"] == "always"
    doc = evaluate(EvalConfig(model=str(ck), data=(str(text_file),), seqlen=64, max_windows=2, device="cpu"))
    assert (doc["settings"]["bos"], doc["settings"]["bos_requested"]) == ("always", "auto")
    assert doc["perplexity"][str(text_file)]["bos"] == "always"
    with pytest.warns(OwlctlWarning, match="adds '<s>' to every sequence"):
        never = evaluate(EvalConfig(model=str(ck), data=(str(text_file),), seqlen=64, max_windows=2, device="cpu",
                                    bos="never"))
    assert never["settings"]["bos"] == "never" and never["perplexity"][str(text_file)]["bos"] == "never"
    assert never["perplexity"][str(text_file)]["windows_sha256"] != doc["perplexity"][str(text_file)]["windows_sha256"]


def test_no_bos_tokenizer_resolves_to_never_without_warning(tiny_llama, text_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OwlctlWarning)
        res = profile(ProfileConfig(model=str(tiny_llama), output=None, calib=str(text_file), **CAL))
    assert res["calibration"]["bos"] == "never"


def test_cli_warns_when_bos_is_dropped(tiny_llama_bos, text_file, tmp_path):
    r = runner.invoke(app, ["profile", str(tiny_llama_bos), "--calib", str(text_file), "--nsamples", "2",
                            "--seqlen", "16", "--bos", "never", "--device", "cpu", "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "--bos never" in r.stderr
    assert json.loads(r.stdout)["calibration"]["bos"] == "never"
    r = runner.invoke(app, ["profile", str(tiny_llama_bos), "--calib", str(text_file), "--bos", "maybe"])
    assert r.exit_code == 2 and "'maybe' is not one of 'auto', 'always', 'never'" in r.stderr  # a usage error


# ----------------------------------------------------------------------------- calibration overlap
@pytest.fixture(scope="module")
def folder_checkpoint(tiny_llama, tmp_path_factory):
    """A checkpoint calibrated on a folder of 24 files (index % 20 > 1: files 02-19 and 22-23 are calibration)."""
    root = tmp_path_factory.mktemp("overlap")
    folder = root / "corpus"
    folder.mkdir()
    for i in range(24):
        body = " ".join(f"Sentence {j} of file {i} is about pruning and outliers." for j in range(12))
        (folder / f"{i:02d}.txt").write_text(f"{body}\n\nClosing paragraph of file {i}, long enough to count.")
    ck = root / "ck"
    prune(PruneConfig(model=str(tiny_llama), output=ck, method="wanda", uniform=True, target_sparsity=0.5,
                      calib=str(folder), **CAL))
    return folder, ck


def test_eval_refuses_a_calibration_file(folder_checkpoint):
    folder, ck = folder_checkpoint
    with pytest.raises(DataError, match="overlaps the calibration text") as e:
        evaluate(EvalConfig(model=str(ck), data=(str(folder / "05.txt"),), seqlen=16, max_windows=1, device="cpu"))
    assert "disjoint" in e.value.hint
    r = runner.invoke(app, ["eval", str(ck), "--data", str(folder / "05.txt"), "--seqlen", "16", "--device", "cpu"])
    assert r.exit_code == 1 and "overlaps the calibration text" in r.stderr and "Traceback" not in r.stderr


def test_eval_accepts_the_held_out_splits(folder_checkpoint):
    folder, ck = folder_checkpoint
    for split in ("test", "validation"):
        doc = evaluate(EvalConfig(model=str(ck), data=(str(folder),), split=split, seqlen=32, max_windows=2,
                                  device="cpu"))
        checks = doc["settings"]["calibration_overlap"]
        assert checks and all(c["overlapping"] == 0 and c["paragraphs_checked"] > 0 for c in checks)
    # a file that was in the folder's test split (index 0) is not calibration text either
    evaluate(EvalConfig(model=str(ck), data=(str(folder / "00.txt"),), seqlen=16, max_windows=1, device="cpu"))


def test_pipeline_refuses_overlapping_eval_text(tiny_llama, folder_checkpoint, tmp_path):
    folder, _ck = folder_checkpoint
    r = runner.invoke(app, ["pipeline", str(tiny_llama), "--calib", str(folder), "--nsamples", "2", "--seqlen", "16",
                            "--eval-data", str(folder / "07.txt"), "--eval-seqlen", "16", "--device", "cpu"])
    assert r.exit_code == 1 and "overlaps the calibration text" in r.stderr


# --------------------------------------------------------------------------------- pre-existing zeros
@pytest.fixture(scope="module")
def zeroed_model(tiny_llama, tmp_path_factory):
    """The tiny llama with 10% of every prunable weight set to exactly zero (as dequantised GGUFs have)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlctl.families import resolve

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    layout = resolve(model)
    g = torch.Generator().manual_seed(0)
    zeros = {}
    with torch.no_grad():
        for i in range(layout.num_blocks):
            for name, lin in layout.linears(i).items():
                hit = torch.rand(lin.weight.shape, generator=g) < 0.1
                lin.weight[hit] = 0.0
                zeros[(i, name)] = int((lin.weight == 0).sum())
    out = tmp_path_factory.mktemp("zeroed") / "m"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out, zeros


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_preexisting_zeros_reported_apart(method, zeroed_model, text_file, tmp_path):
    from safetensors.torch import load_file

    path, zeros = zeroed_model
    ck = tmp_path / "ck"
    res = prune(PruneConfig(model=str(path), output=ck, method=method, uniform=True, target_sparsity=0.3,
                            calib=str(text_file), **CAL))
    report = json.loads((ck / "owlctl-report.json").read_text())
    before = load_file(str(path / "model.safetensors"))
    after = load_file(str(ck / "model.safetensors"))
    for b in report["blocks"]:
        for r in b["linears"]:
            key = f"model.layers.{b['index']}.{r['name']}.weight"
            pre = before[key] == 0
            assert r["preexisting_zeros"] == zeros[(b["index"], r["name"])] == int(pre.sum())
            assert r["zeros"] == int((after[key] == 0).sum())
            assert r["pruned"] == r["expected_pruned"]
            # newly zeroed = mask positions that held a non-zero weight before
            assert 0 < r["newly_zeroed"] <= r["pruned"] and r["pruned"] - r["newly_zeroed"] <= r["preexisting_zeros"]
        assert b["preexisting_zeros"] == sum(r["preexisting_zeros"] for r in b["linears"])
    numel = sum(b["numel"] for b in report["blocks"])
    pre_total = sum(b["preexisting_zeros"] for b in report["blocks"])
    assert report["preexisting_sparsity"] == pytest.approx(pre_total / numel)
    assert report["pruned_sparsity"] == pytest.approx(sum(b["pruned"] for b in report["blocks"]) / numel)
    assert res["preexisting_sparsity"] == report["preexisting_sparsity"] > 0.09
    doc = evaluate(EvalConfig(model=str(ck), data=(str(text_file),), seqlen=64, max_windows=1, device="cpu"))
    a = doc["audit"]
    assert a["status"] == "ok" and a["preexisting_zeros"] == pre_total
    assert a["preexisting_sparsity"] == pytest.approx(report["preexisting_sparsity"])
    assert a["pruned_sparsity"] == pytest.approx(report["pruned_sparsity"])
    assert [b["preexisting_zeros"] for b in a["blocks"]] == [b["preexisting_zeros"] for b in report["blocks"]]
