"""Start-up time of `owlctl --help` and `owlctl allocate` (targets: < 0.5 s and < 0.2 s of owlctl's own work).

Each command runs as a fresh process N times; we report the median wall time and the median CPU time (user +
sys of the child), and for comparison a bare `python -c pass` so the interpreter's own start-up is visible.
`--baseline DIR` also runs another checkout of owlctl (put first on PYTHONPATH) on the same inputs, the two
interleaved run by run, so the ratio is measured side by side. Writes docs/bench_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def once(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def profile_file(tmp: Path) -> Path:
    """A 32-block profile in the oldest format every owlctl version reads (owlctl.profile/1)."""
    prof = tmp / "profile.json"
    blocks = [{"index": i, "name": f"model.layers.{i}", "numel": 1000, "mean_score": 0.5, "score_sum": 500.0,
               "outlier_count": {"5": 10 + i}, "outlier_pct": {"5": (10 + i) / 10},
               "linears": [{"name": "mlp.down_proj", "shape": [20, 50], "numel": 1000, "score_sum": 500.0,
                            "max_score": 9.0, "outlier_count": {"5": 10 + i}}]} for i in range(32)]
    prof.write_text(json.dumps({
        "schema": "owlctl.profile/1", "owlctl_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00",
        "model": {"id": "x", "model_type": "llama", "family": "llama", "revision": None,
                  "content_sha256": "0" * 64, "num_blocks": 32},
        "calibration": {"source": "x", "nsamples": 1, "seqlen": 2, "seed": 0, "tokens_sha256": "0" * 64},
        "score": {"name": "wanda", "definition": "", "outlier_rule": "", "pct_units": "percent"},
        "outlier_m": [5.0], "blocks": blocks}))
    return prof


def run(n: int = 7, baseline: str | None = None) -> dict:
    prof = profile_file(Path(tempfile.mkdtemp()))
    exe = [sys.executable, "-m", "owlctl"]
    commands = {"python_bare": [sys.executable, "-c", "pass"], "help": [*exe, "--help"],
                "allocate": [*exe, "allocate", str(prof), "--target-sparsity", "0.7", "--json"]}
    variants = {"current": {**os.environ, "PYTHONPATH": str(ROOT)}}
    if baseline:
        variants["baseline"] = {**os.environ, "PYTHONPATH": str(Path(baseline).resolve())}
    samples: dict = {v: {c: ([], []) for c in commands} for v in variants}
    for _ in range(n):
        for cname, cmd in commands.items():
            for vname, env in variants.items():  # interleaved: load changes hit both alike
                wall, cpu = once(cmd, env)
                samples[vname][cname][0].append(wall)
                samples[vname][cname][1].append(cpu)
    res: dict = {"runs": n, "load_average_before": round(os.getloadavg()[0], 2)}
    for vname in variants:
        for cname in commands:
            walls, cpus = samples[vname][cname]
            res.setdefault(vname, {})[f"{cname}_s"] = round(statistics.median(walls), 4)
            res[vname][f"{cname}_cpu_s"] = round(statistics.median(cpus), 4)
        for c in ("help", "allocate"):
            res[vname][f"{c}_minus_python_s"] = round(res[vname][f"{c}_s"] - res[vname]["python_bare_s"], 4)
    if baseline:
        res["baseline_path"] = str(baseline)
        res["ratio_current_over_baseline"] = {
            c: round(res["current"][f"{c}_minus_python_s"] / res["baseline"][f"{c}_minus_python_s"], 3)
            for c in ("help", "allocate")}
    res["import_torch_s"] = round(statistics.median(once([sys.executable, "-c", "import torch"],
                                                         variants["current"])[0] for _ in range(3)), 4)
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--baseline", help="another owlctl checkout to time side by side (e.g. a git worktree)")
    args = ap.parse_args()
    out = run(args.runs, args.baseline)
    print(json.dumps(out, indent=2))
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench_startup.json").write_text(json.dumps(out, indent=2) + "\n")
