"""How long a mistake costs: every check that needs no weights runs before any weight is read.

Runs each mistake as a fresh `owlctl` process on the built-in model (already converted in the cache) and
records its wall time, CPU time and exit code (median of --repeat runs), with the load average. Target:
under 2 s each (a 7B load and calibration take minutes to hours, so a typo must not cost them).

    python benchmarks/bench_cheap_checks.py            # writes docs/cheap_checks.json and docs/cheap_checks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m"


def run(args: list[str], env: dict, cwd: Path) -> tuple[float, float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "owlctl", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status), err.strip().splitlines()[-1:]


def mistakes(work: Path, profile: Path) -> list[tuple[str, list[str], dict]]:
    out = str(work / "out")
    (work / "exists").mkdir(exist_ok=True)
    hide_onnx = work / "hide_onnx"
    hide_onnx.mkdir(exist_ok=True)
    (hide_onnx / "sitecustomize.py").write_text("import sys\nsys.modules['onnx'] = None\n")  # as if not installed
    cases = [
        ("N:M whose M does not divide the widths", ["nm", MODEL, "--pattern", "3:7", "-o", out], {}),
        ("N:M keeping no weight (0:4)", ["nm", MODEL, "--pattern", "0:4", "-o", out], {}),
        ("N:M syntax", ["nm", MODEL, "--pattern", "2-4", "-o", out], {}),
        ("--outlier-m nan", ["prune", MODEL, "--from-profile", str(profile), "-s", "0.7", "-m", "nan", "-o", out], {}),
        ("--lambda -0.1", ["prune", MODEL, "--from-profile", str(profile), "-s", "0.7", "-l", "-0.1", "-o", out], {}),
        ("M not in the profile", ["prune", MODEL, "--from-profile", str(profile), "-s", "0.7", "-m", "7", "-o", out],
         {}),
        ("--target-sparsity 1.0", ["prune", MODEL, "--uniform", "-s", "1.0", "-o", out], {}),
        ("--nsamples 0", ["profile", MODEL, "--nsamples", "0", "-o", str(work / "p.json")], {}),
        ("prune --seqlen beyond the context", ["prune", MODEL, "--uniform", "-s", "0.7", "--seqlen", "9000", "-o",
                                               out], {}),
        ("profile --seqlen beyond the context", ["profile", MODEL, "--seqlen", "9000", "-o", str(work / "p.json")],
         {}),
        ("eval --seqlen beyond the context", ["eval", MODEL, "--seqlen", "9000"], {}),
        ("unknown --method", ["prune", MODEL, "--method", "obc", "--uniform", "-s", "0.7", "-o", out], {}),
        ("unknown --sparse-kernel", ["bench", MODEL, "--backend", "torch-sparse", "--sparse-kernel", "magic"], {}),
        ("export onnx without onnx installed", ["export", MODEL, "--format", "onnx", "-o", out],
         {"PYTHONPATH": str(hide_onnx)}),
        ("output exists, no --force", ["prune", MODEL, "--uniform", "-s", "0.7", "-o", str(work / "exists")], {}),
        ("output on a read-only disk", ["prune", MODEL, "--uniform", "-s", "0.7", "-o", "/sys/owlctl-out"], {}),
    ]
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "cheap_checks.json")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        profile = work / "profile.json"
        subprocess.run([sys.executable, "-m", "owlctl", "profile", MODEL, "--nsamples", "2", "--seqlen", "32",
                        "--outlier-m", "3,5", "-o", str(profile), "-q", "--device", "cpu"], check=True, env=env)
        load_before = os.getloadavg()
        baseline = [run(["--version"], env, work)[0] for _ in range(args.repeat)]
        rows = []
        for name, cmd, extra in mistakes(work, profile):
            runs = [run(cmd, {**env, **extra}, work) for _ in range(args.repeat)]
            rows.append({"mistake": name, "command": "owlctl " + " ".join(cmd).replace(str(work), "WORK"),
                         "exit_code": runs[0][2], "message": runs[0][3][0] if runs[0][3] else "",
                         "wall_s_median": statistics.median(r[0] for r in runs),
                         "wall_s_max": max(r[0] for r in runs),
                         "cpu_s_median": statistics.median(r[1] for r in runs)})
        load_after = os.getloadavg()
    doc = {"what": "wall time from process start to the error, per mistake, on " + MODEL,
           "target_s": 2.0, "repeat": args.repeat, "python": platform.python_version(),
           "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
           "owlctl_version_s_median": statistics.median(baseline), "rows": rows,
           "all_under_target": all(r["wall_s_max"] < 2.0 for r in rows)}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# How long a mistake costs", "",
             "Generated by `python benchmarks/bench_cheap_checks.py` (do not edit by hand). Each mistake runs as a "
             f"fresh `owlctl` process on `{MODEL}` (already converted in the cache); wall and CPU time are the "
             f"median of {args.repeat} runs. Every check that needs no weights (option values and ranges, N:M "
             "syntax and divisibility from config.json, the profile's M values, the model's context, the extras a "
             "command needs, the output location) runs before any weight is read; the target is under 2 s.", "",
             f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; `owlctl --version` alone takes "
             f"{statistics.median(baseline):.2f} s.", "",
             "| mistake | exit | wall s (median / max) | CPU s | message |", "|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|")
        lines.append(f"| {r['mistake']} | {r['exit_code']} | {r['wall_s_median']:.2f} / {r['wall_s_max']:.2f} | "
                     f"{r['cpu_s_median']:.2f} | {msg} |")
    lines += ["", f"All under 2 s: {'yes' if doc['all_under_target'] else 'NO'}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if doc["all_under_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
