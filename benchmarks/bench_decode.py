"""Decode (and prefill) speed, dense vs 70% sparse, on the built-in model for every `owlctl bench` backend.

    python benchmarks/bench_decode.py                       # prunes the 70% checkpoint first if needed
    python benchmarks/bench_decode.py --sparse /tmp/w70 --backends torch-sparse,onnxruntime

Each configuration is one `owlctl.ops.bench.bench` call, so dense and sparse are measured in the same run
(medians of >= 3 runs after a warm-up, one thread); --rounds repeats every configuration, interleaved, and
the table reports medians over rounds (the machine this was written on is shared, so single runs are noisy). Writes docs/bench_decode.json (every document) and
docs/bench_decode.md (the summary table). The 70% checkpoint is
`owlctl prune builtin:smollm2-135m --method wanda --uniform -s 0.7 -o DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, backend, sparse kernel)
CONFIGS = {
    "torch": ("torch", None),
    "torch-sparse": ("torch-sparse", "auto"),
    "torch-sparse:csr": ("torch-sparse", "csr"),
    "torch-sparse:torch-csr": ("torch-sparse", "torch-csr"),
    "torch-sparse:torch-bsr": ("torch-sparse", "torch-bsr"),
    "onnxruntime": ("onnxruntime", None),
    "deepsparse": ("deepsparse", None),
}


def ensure_sparse(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    print(f"pruning the 70% checkpoint into {path} (several minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "owlctl", "prune", "builtin:smollm2-135m", "--method", "wanda", "--uniform",
                    "-s", "0.7", "-o", str(path), "-q"], check=True)
    return path


def main() -> int:
    from owlctl.deploy.eol.deepsparse_host import cpu_info, deepsparse_venv
    from owlctl.engine.models import cache_dir
    from owlctl.ops.bench import BenchConfig, bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="builtin:smollm2-135m")
    ap.add_argument("--sparse", type=Path, default=cache_dir() / "bench" / "wanda70")
    ap.add_argument("--backends", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every configuration (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_decode")
    args = ap.parse_args()

    sparse = ensure_sparse(args.sparse)
    names = args.backends.split(",")
    docs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.rounds):  # rounds interleave the configurations, so slow drift hits them all alike
        for name in names:
            backend, kernel = CONFIGS[name]
            if backend == "deepsparse" and not (deepsparse_venv() / "bin" / "python").is_file():
                print(f"skipping {name}: no DeepSparse venv (owlctl bench --cpu --setup)", file=sys.stderr)
                continue
            cfg = BenchConfig(model=args.dense, sparse=str(sparse), backend=backend, prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, runs=args.runs, threads=args.threads,
                              sparse_kernel=kernel or "auto")
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            doc = bench(cfg)
            doc["benchmark"] = {"name": name, "round": rnd, "wall_seconds": time.perf_counter() - t,
                                "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0]}
            docs[name].append(doc)
            d, s_ = doc["rows"]
            print(f"[{name} round {rnd}] dense {d['decode']['tokens_per_s']:.2f} tok/s, sparse "
                  f"{s_['decode']['tokens_per_s']:.2f} tok/s, x{doc['comparison']['decode_speedup']:.2f} "
                  f"(load {load0:.1f})", file=sys.stderr, flush=True)

    cpu = cpu_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    flat = [d for n in names for d in docs[n]]
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "documents": flat}, indent=2) + "\n")
    med = statistics.median
    lines = [
        f"Measured by `python benchmarks/bench_decode.py --rounds {args.rounds}` on {cpu['model']} "
        f"({cpu['logical_cpus']} logical CPUs, shared with other jobs), {args.threads} thread, prompt "
        f"{args.prompt_len} random tokens, {args.new_tokens} greedy decode steps, batch 1; each round is one "
        f"`owlctl bench` run (median of {args.runs} runs after one warm-up). Values: median over rounds; "
        "best = the fastest run of any round. Dense: `builtin:smollm2-135m`; sparse: wanda uniform 70%.",
        "",
        "| config | dense backend | sparse backend | dense decode tok/s (best) | sparse decode tok/s (best) | "
        "decode x | dense prefill tok/s | sparse prefill tok/s | prefill x | sparse step p50 / p99 ms | "
        "max abs diff | rounds | load avg |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        ds = docs[name]
        if not ds:
            continue
        dr = [d["rows"][0] for d in ds]
        sr = [d["rows"][1] for d in ds]
        kernel = f" ({sr[0]['kernel']})" if sr[0].get("kernel") else ""
        diffs = [r["max_abs_diff_vs_torch"] for r in sr if r.get("max_abs_diff_vs_torch") is not None]
        lines.append(
            f"| {name} | {dr[0]['backend']} | {sr[0]['backend']}{kernel} | "
            f"{med([r['decode']['tokens_per_s'] for r in dr]):.2f} ({max(r['decode']['tokens_per_s_best'] for r in dr):.2f}) | "
            f"{med([r['decode']['tokens_per_s'] for r in sr]):.2f} ({max(r['decode']['tokens_per_s_best'] for r in sr):.2f}) | "
            f"{med([d['comparison']['decode_speedup'] for d in ds]):.2f} | "
            f"{med([r['prefill']['tokens_per_s'] for r in dr]):.1f} | {med([r['prefill']['tokens_per_s'] for r in sr]):.1f} | "
            f"{med([d['comparison']['prefill_speedup'] for d in ds]):.2f} | "
            f"{med([r['decode']['step_ms']['p50'] for r in sr]):.1f} / {med([r['decode']['step_ms']['p99'] for r in sr]):.1f} | "
            f"{max(diffs):.1e} | {len(ds)} | "
            f"{min(d['benchmark']['loadavg_1min_before'] for d in ds):.1f}-{max(d['benchmark']['loadavg_1min_after'] for d in ds):.1f} |"
            if diffs else f"| {name} | (no check) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
