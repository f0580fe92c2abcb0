"""Start-up time of `owlctl --help` and `owlctl allocate` (targets: < 0.5 s and < 0.2 s of owlctl's own work).

Each command runs as a fresh process N times; we report the median wall time, and for comparison the
median of a bare `python -c pass` so the interpreter's own start-up is visible. Writes docs/bench_startup.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int = 7) -> dict:
    tmp = Path(tempfile.mkdtemp())
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
    exe = [sys.executable, "-m", "owlctl"]
    res = {
        "python_bare_s": timed([sys.executable, "-c", "pass"], n),
        "help_s": timed([*exe, "--help"], n),
        "allocate_s": timed([*exe, "allocate", str(prof), "-s", "0.7", "--json"], n),
        "import_torch_s": timed([sys.executable, "-c", "import torch"], 3),
        "runs": n,
    }
    res["help_minus_python_s"] = res["help_s"] - res["python_bare_s"]
    res["allocate_minus_python_s"] = res["allocate_s"] - res["python_bare_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


if __name__ == "__main__":
    out = run()
    print(json.dumps(out, indent=2))
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench_startup.json").write_text(json.dumps(out, indent=2) + "\n")
