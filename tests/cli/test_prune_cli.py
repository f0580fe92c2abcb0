"""`owlctl profile`, `prune` and `nm` through the Typer app: exit codes, --json on stdout, logs on stderr."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()


def _calib(text_file):
    return ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


def test_profile_json_and_file(tiny_llama, text_file, tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", str(tiny_llama), "-o", str(out), "--json", "--outlier-m", "3,5", *_calib(text_file)])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["schema"] == "owlctl.profile/2"
    assert doc["outlier_m"] == [3.0, 5.0] and doc["output"] == str(out)
    assert json.loads(out.read_text())["blocks"] == doc["blocks"]
    r2 = runner.invoke(app, ["profile", str(tiny_llama), "-o", str(out), *_calib(text_file)])
    assert r2.exit_code == 1 and "already exists" in r2.stderr and "--force" in r2.stderr
    assert "Traceback" not in r2.stderr


def test_prune_and_nm_json(tiny_llama, text_file, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny_llama), "--method", "sparsegpt", "--uniform", "-s", "0.5",
                            "-o", str(tmp_path / "ck"), "--json", *_calib(text_file)])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["method"] == "sparsegpt" and doc["mask_mismatches"] == 0
    assert doc["realised_sparsity"] == pytest.approx(0.5, abs=0.01)
    r = runner.invoke(app, ["nm", str(tiny_llama), "--pattern", "2:4", "-o", str(tmp_path / "nm"), "--json",
                            *_calib(text_file)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["realised_sparsity"] == pytest.approx(0.5)


def test_prune_table_on_stdout(tiny_llama, text_file, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny_llama), "--method", "magnitude", "--uniform", "-s", "0.3",
                            "-o", str(tmp_path / "ck"), *_calib(text_file)])
    assert r.exit_code == 0, r.stderr
    assert "realised" in r.stdout and "0.3" in r.stdout


def test_prune_unknown_method_is_a_usage_error(tiny_llama, text_file, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny_llama), "-o", str(tmp_path / "ck"), "--method", "lottery",
                            "--uniform", "-s", "0.5", *_calib(text_file)])
    assert r.exit_code == 2 and "'lottery' is not one of 'magnitude', 'wanda', 'sparsegpt'" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--uniform", "-s", "1.2"], "[0, 1)"),
    (["--from-profile", "missing.json", "-s", "0.5"], "not found"),
])
def test_prune_bad_input_exit_1(args, msg, tiny_llama, text_file, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny_llama), "-o", str(tmp_path / "ck"), *args, *_calib(text_file)])
    assert r.exit_code == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "ck").exists()


def test_truncated_profile_is_a_clear_error(tiny_llama, text_file, tmp_path):
    p = tmp_path / "p.json"
    p.write_text('{"schema": "owlctl.profile/1", "blocks": [')
    r = runner.invoke(app, ["prune", str(tiny_llama), "-o", str(tmp_path / "ck"), "--from-profile", str(p), "-s",
                            "0.5", *_calib(text_file)])
    assert r.exit_code == 1 and "not valid JSON" in r.stderr


def test_usage_error_is_exit_2():
    r = runner.invoke(app, ["prune"])
    assert r.exit_code == 2


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    r = runner.invoke(app, ["profile", str(tmp_path / "m"), "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    listed = {line.split()[0] for line in r.stdout.split("Commands")[1].splitlines()[1:] if line.strip()}
    for cmd in ("profile", "allocate", "prune", "nm", "eval", "finetune", "export", "bench"):
        assert cmd in listed
