"""Several processes (torch.distributed, gloo on CPU), launched from the test with torchrun, against one.

The same profile, prunes (wanda and sparsegpt x uniform and OWL, one streamed from disk) and perplexities run
in one plain process, under `torchrun --nproc-per-node 1` and under `--nproc-per-node 2` (tests/engine/
dist_worker.py, one thread per process). Exact: profile counts, per-block sparsity, every mask, wanda's
weights and the per-window losses, against the plain process too; SparseGPT's weights are bit-identical
between 1 and 2 launched processes (float64 Hessians) and agree with the plain process's (float32 Hessians)
to float rounding. Then the failures: mismatched arguments, more processes than batches, a killed rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each launch starts two interpreters that import torch (~20 s on a busy box)

WORKER = Path(__file__).with_name("dist_worker.py")
RUNS = ("wanda-uniform", "wanda-owl", "sparsegpt-uniform", "sparsegpt-owl")


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OWLCTL_DIST_TIMEOUT": "60"}


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def suites(tiny_llama, text_file, tmp_path_factory):
    """world -> output folder of the worker: 0 = a plain process, 1 and 2 = launched by torchrun."""
    out = {}
    for world in (0, 1, 2):
        d = tmp_path_factory.mktemp(f"dist{world}")
        cmd = ([sys.executable, str(WORKER)] if world == 0 else _torchrun(world, str(WORKER)))
        r = subprocess.run(cmd + [str(d), str(tiny_llama), str(text_file)], env=_env(), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[world] = d
    return out


def test_results_do_not_depend_on_the_number_of_processes(suites):
    res = {w: json.loads((d / "results.json").read_text()) for w, d in suites.items()}
    assert [res[w]["world"] for w in (0, 1, 2)] == [1, 1, 2]
    for key in ("profile", "ppl", *RUNS):
        assert res[2][key] == res[1][key] == res[0][key], key  # outlier counts, block sparsities, window losses
    prof = [json.loads((suites[w] / "profile.json").read_text())["blocks"] for w in (0, 2)]
    assert [[m["outlier_count"] for m in b["linears"]] for b in prof[0]] == \
        [[m["outlier_count"] for m in b["linears"]] for b in prof[1]]


@pytest.mark.parametrize("run", RUNS)
def test_masks_and_row_counts_are_identical(suites, run):
    w0, w1, w2 = (_weights(suites[w] / run) for w in (0, 1, 2))
    assert w0.keys() == w2.keys()
    for name in w0:
        m0, m2 = w0[name] == 0, w2[name] == 0
        assert (m0 == m2).all(), name
        assert (m0.sum(dim=-1) == m2.sum(dim=-1)).all() if m0.dim() == 2 else True
        assert (w1[name] == w2[name]).all(), name  # 1 vs 2 launched processes: bit-identical weights
        if run.startswith("wanda"):
            assert (w0[name] == w2[name]).all(), name
        else:  # the plain process sums its Hessians in float32: the same masks, weights to float rounding
            assert (w0[name] - w2[name]).abs().max() <= 1e-4 * max(1.0, w0[name].abs().max().item()), name


def _owlctl_traceback(err: str) -> bool:
    """A traceback through owlctl's code (torchrun prints its own ChildFailedError traceback)."""
    return any(line.strip().startswith("File ") and "/owlctl/" in line for line in err.splitlines())


def _cli(n: int, args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(script)] if script is not None else ["-m", "owlctl"]
    return subprocess.run(_torchrun(n, *target, *args), env=_env(), capture_output=True, text=True, timeout=300)


def _prune_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--method", "wanda", "--uniform", "-s", "0.5", "--calib", str(corpus),
            "--seqlen", "32", "--batch-size", "2", "--device", "cpu", "-o", str(out), *extra]


def test_more_processes_than_batches_is_a_clear_error(tiny_llama, text_file, tmp_path):
    r = _cli(2, _prune_args(tiny_llama, text_file, tmp_path / "ck", "--nsamples", "2"))
    assert r.returncode != 0
    assert r.stderr.count("2 processes but only 1 batch(es)") == 1, r.stderr
    assert "hint: start at most 1 processes" in r.stderr and not _owlctl_traceback(r.stderr)
    assert os.listdir(tmp_path) == []


def test_mismatched_arguments_across_ranks(tiny_llama, text_file, tmp_path):
    script = tmp_path / "per_rank.py"  # rank 1 asks for another sparsity
    script.write_text("import os, sys\nfrom owlctl.cli.main import run\n"
                      "if os.environ['RANK'] == '1':\n    sys.argv[sys.argv.index('-s') + 1] = '0.6'\nrun()\n")
    out = tmp_path / "out"
    r = _cli(2, _prune_args(tiny_llama, text_file, out / "ck", "--nsamples", "4"), script)
    assert r.returncode != 0
    assert r.stderr.count("were given different settings (command line): rank(s) 1 differ from rank 0") == 1, \
        r.stderr
    assert not out.exists() or os.listdir(out) == []


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def test_a_killed_rank_stops_every_rank_and_leaves_no_output(text_file, tmp_path):
    from tiny import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "deep", layers=12)  # long enough a run to stop in the middle
    out = tmp_path / "out"
    args = _prune_args(model, text_file, out / "ck", "--nsamples", "256", "--method", "sparsegpt")
    proc = subprocess.Popen(_torchrun(2, "-m", "owlctl", *args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    while True:  # rank 0's plain progress: the first block is done, the partial output exists
        line = proc.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
        if "block 1/" in line:
            break
    victim = next(p for p in _children(proc.pid) if _rank_of(p) == "1")
    os.kill(victim, signal.SIGSTOP)  # frozen mid-run, whatever the speed of the machine
    assert any(n.startswith(".ck.partial-") for n in os.listdir(out)), os.listdir(out)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    _out, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 90  # no hang: far below the collective timeout of the launcher's default
    assert proc.returncode != 0
    # rank 0 reports the lost peer (or, if the launcher's SIGTERM came first, that it was stopped)
    assert "another process of the run stopped" in err or "terminated (SIGTERM)" in err, err
    assert not _owlctl_traceback(err), err
    assert os.listdir(out) == [], os.listdir(out)  # no checkpoint, no partial directory, no lock
