"""owlctl search on tiny models: the allocation has the requested mean and respects the level bounds, the
result is deterministic for a seed, the winner's objective is <= every seed's, a resumed search gives the
same result as an uninterrupted one, the uniform candidate of the database is `prune --uniform` bit for bit,
and bad input fails before any work."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from owlctl.cli.main import app
from owlctl.engine.search.space import mutate, nm_space, snap, unstructured_space
from owlctl.errors import InputError
from owlctl.ops.search import SearchConfig, parse_budget, search

SMALL = {"nsamples": 4, "seqlen": 32, "objective_windows": 4, "objective_seqlen": 16, "offspring": 4,
         "survivors": 2, "device": "cpu"}


def _cfg(model, text_file, tmp_path, name="a", **kw):
    base = dict(model=str(model), output=tmp_path / f"{name}.json", calib=str(text_file), method="wanda",
                target_sparsity=0.5, budget="12", verify=False, **SMALL)
    base.update(kw)
    return SearchConfig(**base)


def _blocks(doc):
    return [(b["sparsity"], b["n_keep"]) for b in doc["blocks"]]


def _stable(info):
    return {k: v for k, v in info.items() if k not in ("seconds", "rounds", "database", "window_forwards")}


@pytest.fixture(scope="module")
def first(tiny_llama, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    return search(_cfg(tiny_llama, text_file, tmp)), tmp


# ------------------------------------------------------------------------------------------ the space
def test_snap_keeps_the_sum_and_the_bounds():
    space = unstructured_space(0.7, 0.025, 0.15, 0.99, [10] * 7, "blocks")
    assert (space.k_lo, space.k_hi) == (-6, 6)
    rng = random.Random(0)
    for _ in range(200):
        x = [rng.uniform(-8, 8) for _ in range(7)]
        x = [v - sum(x) / 7 for v in x]
        k = snap(space, x)
        assert sum(k) == 0 and all(-6 <= v <= 6 for v in k)


def test_mutation_keeps_the_mean_per_group():
    space = unstructured_space(0.5, 0.05, 0.2, 0.99, [10, 10, 20, 20, 20], "params")
    rng = random.Random(1)
    k = (0,) * 5
    for _ in range(300):
        k = mutate(space, k, rng, 3)
        assert k[0] + k[1] == 0 and k[2] + k[3] + k[4] == 0
        assert all(space.k_lo <= v <= space.k_hi for v in k)


def test_nm_space_keeps_at_least_one_weight():
    space = nm_space(2, 4, 3, [5] * 4, "blocks")
    assert [space.value(k) for k in space.levels] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("text, want", [("20m", {"kind": "minutes", "value": 20.0}), ("90s", {"kind": "minutes",
                                        "value": 1.5}), ("300", {"kind": "evaluations", "value": 300})])
def test_budget(text, want):
    assert parse_budget(text).as_dict() == want


@pytest.mark.parametrize("text", ["0", "0m", "-3", "1.5", "abc", ""])
def test_bad_budget(text):
    with pytest.raises(InputError):
        parse_budget(text)


# ------------------------------------------------------------------------------------------ the search
def test_mean_bounds_and_seeds(first):
    doc, _ = first
    info = doc["params"]["search"]
    assert doc["params"]["allocator"] == "search" and doc["command"] == "search"
    assert doc["mean_block_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert doc["allocated_sparsity"] == pytest.approx(0.5, abs=1e-12)  # equal blocks: params mean too
    lo, hi = min(info["levels"]["values"]), max(info["levels"]["values"])
    assert all(lo - 1e-12 <= b["sparsity"] <= hi + 1e-12 for b in doc["blocks"])
    assert info["seeds"][0]["name"] == "uniform" and len(info["seeds"]) > 1
    assert all(info["winner_objective"] <= s["objective"] for s in info["seeds"])
    assert info["evaluations"] == 12 and info["objective_data"]["split"] == "validation"
    best = [r["best_objective"] for r in info["rounds"]]
    assert best == sorted(best, reverse=True)  # never worse round after round


def test_deterministic_for_a_seed(first, tiny_llama, text_file, tmp_path):
    doc, _ = first
    again = search(_cfg(tiny_llama, text_file, tmp_path))
    assert _blocks(again) == _blocks(doc)
    assert _stable(again["params"]["search"]) == _stable(doc["params"]["search"])
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in again["params"]["search"]["rounds"]]
    assert rounds == [{k: v for k, v in r.items() if k != "seconds"} for r in doc["params"]["search"]["rounds"]]


def test_resume_gives_the_uninterrupted_result(first, tiny_llama, text_file, tmp_path, monkeypatch):
    from owlctl.engine.search import objective

    doc, _ = first
    real = objective.window_kl
    calls, stop = [0], doc["params"]["search"]["window_forwards"] * 2 // 3

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] > stop:  # after the seeds and some of the children
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(objective, "window_kl", flaky)
    with pytest.raises(KeyboardInterrupt):
        search(_cfg(tiny_llama, text_file, tmp_path))
    assert not (tmp_path / "a.json").exists()  # no output from the interrupted run
    monkeypatch.setattr(objective, "window_kl", real)
    resumed = search(_cfg(tiny_llama, text_file, tmp_path))
    assert _blocks(resumed) == _blocks(doc)
    assert _stable(resumed["params"]["search"]) == _stable(doc["params"]["search"])
    assert resumed["params"]["search"]["window_forwards"] < doc["params"]["search"]["window_forwards"]


def test_uniform_level_is_prune_uniform(first, tiny_llama, text_file, tmp_path):
    """The database's target level of every block is exactly what `prune --uniform` writes."""
    from safetensors.torch import load_file

    from owlctl.engine.search.database import LevelStore
    from owlctl.ops.prune import PruneConfig, prune

    doc, tmp = first
    prune(PruneConfig(model=str(tiny_llama), output=tmp_path / "ck", method="wanda", uniform=True,
                      target_sparsity=0.5, calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    ck = load_file(str(tmp_path / "ck" / "model.safetensors"))
    store = LevelStore(tmp / "a.json.search-db", {})
    for i, b in enumerate(doc["blocks"]):
        for name, w in store.weights(i, 0).items():
            assert torch.equal(ck[f"{b['name']}.{name}.weight"], w), (i, name)


def test_prune_uses_the_allocation(first, tiny_llama, text_file, tmp_path):
    from owlctl.ops.prune import PruneConfig, prune

    doc, tmp = first
    res = prune(PruneConfig(model=str(tiny_llama), output=tmp_path / "ck", method="wanda",
                            allocation=tmp / "a.json", calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    assert res["allocator"] == "search" and res["mask_mismatches"] == 0
    assert [b["target_sparsity"] for b in res["blocks"]] == [b["sparsity"] for b in doc["blocks"]]


def test_verify_and_mixed_nm(tiny_llama, text_file, tmp_path):
    from owlctl.ops.prune import PruneConfig, nm

    doc = search(_cfg(tiny_llama, text_file, tmp_path, target_sparsity=None, pattern="2:4", verify=True,
                      method="sparsegpt"))
    info = doc["params"]["search"]
    assert doc["pattern"] == {"kind": "nm", "n_keep": 2, "m": 4}
    assert sum(b["n_keep"] for b in doc["blocks"]) == 2 * len(doc["blocks"])
    assert all(1 <= b["n_keep"] <= 4 for b in doc["blocks"])
    v = info["verified"]
    assert v["chosen"] in ("search", "uniform") and v["database_objective"] == info["winner_objective"]
    if v["chosen"] == "uniform":
        assert all(b["n_keep"] == 2 for b in doc["blocks"])
    res = nm(PruneConfig(model=str(tiny_llama), output=tmp_path / "ck", method="sparsegpt",
                         allocation=tmp_path / "a.json", calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    assert res["mask_mismatches"] == 0


def test_owl_only(tiny_llama, text_file, tmp_path):
    doc = search(_cfg(tiny_llama, text_file, tmp_path, mode="owl-grid", balance="params"))
    info = doc["params"]["search"]
    assert info["mode"] == "owl-grid" and info["evaluations"] == 0 and info["rounds"] == []
    assert doc["params"]["allocator"] in ("owl", "uniform")
    assert info["chosen"] == info["best_seed"]
    assert doc["allocated_sparsity"] == pytest.approx(0.5, abs=1e-9)


def test_other_settings_refuse_the_database(first, tiny_llama, text_file):
    _doc, tmp = first
    with pytest.raises(InputError, match="other settings"):
        search(_cfg(tiny_llama, text_file, tmp, name="b", db=tmp / "a.json.search-db", target_sparsity=0.6))


# ------------------------------------------------------------------------------------------ the CLI
runner = CliRunner()


def _cli(tiny_llama, text_file, out, *extra):
    args = ["search", str(tiny_llama), "-o", str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen",
            "32", "--objective-windows", "2", "--objective-seqlen", "16", "--device", "cpu", *extra]
    return runner.invoke(app, args)


@pytest.mark.parametrize("extra, code, words", [
    (["-s", "0.5", "--method", "nope"], 2, "nope"),
    (["-s", "0.5", "--budget", "0"], 1, "positive"),
    (["-s", "1.5"], 1, "--target-sparsity"),
    (["-s", "0.5", "--mode", "fast"], 2, "fast"),
    (["-s", "0.5", "--objective-split", "test"], 1, "test split"),
    (["--budget", "4"], 1, "--target-sparsity"),
    (["-s", "0.5", "--pattern", "3:8"], 1, "conflicts"),
])
def test_bad_input(tiny_llama, text_file, tmp_path, extra, code, words):
    r = _cli(tiny_llama, text_file, tmp_path / "x.json", *extra)
    assert r.exit_code == code, r.stderr
    assert words in r.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.json.search-db").exists()


def test_json_output_validates(tiny_llama, text_file, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    r = _cli(tiny_llama, text_file, tmp_path / "s.json", "-s", "0.5", "--budget", "4", "--offspring", "2",
             "--no-verify", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "schemas" / "allocation.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["command"] == "search" and doc["schema"] == "owlctl.allocation/2"
    assert json.loads((tmp_path / "s.json").read_text())["params"]["search"]["seed"] == 0


def test_time_budget_stops_when_the_space_is_exhausted(tiny_llama, text_file, tmp_path):
    """A tiny space has few neighbours: a time budget stops once no new child turns up, not at the clock."""
    doc = search(_cfg(tiny_llama, text_file, tmp_path, budget="30m", level_step=0.25, spread=0.25))
    info = doc["params"]["search"]
    assert info["stopped"] == "exhausted" and info["budget"] == {"kind": "minutes", "value": 30.0}
    assert doc["mean_block_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert all(info["winner_objective"] <= s["objective"] for s in info["seeds"])


def test_plain_lines_per_round_and_quiet(tiny_llama, text_file, tmp_path):
    r = _cli(tiny_llama, text_file, tmp_path / "p.json", "-s", "0.5", "--budget", "4", "--offspring", "2",
             "--no-verify")
    assert r.exit_code == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("search generation")]
    assert len(lines) == 2 and "best" in lines[-1]  # 4 children, 2 per round, off a terminal
    r = _cli(tiny_llama, text_file, tmp_path / "q.json", "-s", "0.5", "--budget", "4", "--offspring", "2",
             "--no-verify", "-q")
    assert r.exit_code == 0 and r.stderr == ""


@pytest.mark.parametrize("damage", ["manifest", "level"])
def test_damaged_database(first, tiny_llama, text_file, tmp_path, damage):
    import shutil

    _doc, tmp = first
    db = tmp_path / "db"
    shutil.copytree(tmp / "a.json.search-db", db)
    target = db / "manifest.json" if damage == "manifest" else db / "block_001" / "k+0.safetensors"
    target.write_bytes(target.read_bytes()[:40])
    r = _cli(tiny_llama, text_file, tmp_path / "d.json", "-s", "0.5", "--budget", "12", "--offspring", "4",
             "--objective-windows", "4", "--no-verify", "--db", str(db))
    assert r.exit_code == 1, r.stderr
    assert "damaged" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d.json").exists()


def test_offload_disk_refused(tiny_llama, text_file, tmp_path):
    r = _cli(tiny_llama, text_file, tmp_path / "x.json", "-s", "0.5", "--offload", "disk")
    assert r.exit_code == 1 and "in memory" in r.stderr


@pytest.mark.slow
def test_real_model_search_beats_its_seeds(tmp_path):
    """On the built-in SmolLM2: a short search (Wanda 70%, 24 children, small level grid) writes an allocation
    with the target mean whose objective is <= every seed's, and `prune --allocation` accepts it."""
    out = tmp_path / "s.json"
    r = runner.invoke(app, ["search", "builtin:smollm2-135m", "--method", "wanda", "-s", "0.7", "--nsamples", "8",
                            "--seqlen", "128", "--objective-windows", "4", "--objective-seqlen", "128",
                            "--level-step", "0.05", "--budget", "24", "--seed-m", "5", "--seed-lambda", "0.08,0.16",
                            "--device", "cpu", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    info = doc["params"]["search"]
    assert doc["mean_block_sparsity"] == pytest.approx(0.7, abs=1e-9)
    assert all(info["winner_objective"] <= s["objective"] for s in info["seeds"])
    r = runner.invoke(app, ["prune", "builtin:smollm2-135m", "--method", "wanda", "--allocation", str(out),
                            "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "-o", str(tmp_path / "ck"),
                            "--json", "-q"])
    assert r.exit_code == 0, r.stderr
