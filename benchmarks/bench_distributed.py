"""Pruning on 1 vs 2 processes (torch.distributed, gloo on CPU), one thread each, on the built-in model.

For wanda and sparsegpt (uniform, 50%): `torchrun --nproc-per-node 1` and `torchrun --nproc-per-node 2`
(and, for sparsegpt, a plain process: its Hessians are summed in float32), all with OMP_NUM_THREADS=1,
each writing its checkpoint; then the checkpoints are compared (masks, per-row pruned counts, weights).
Reports wall time (the whole command: interpreter start, model load, calibration, pruning, writing),
owlctl's own total, the seconds rank 0 spent in collectives (waiting included: a rank that finishes its
share first waits in the next collective), the 2-process / 1-process ratio, CPU time of the children, and
the load average before and after each run (the machine is shared: the ratio is only meaningful with the
load it was measured under).

Writes docs/bench_distributed.json and prints docs/distributed.md's table.
  flock /tmp/owlctl-bench.lock python benchmarks/bench_distributed.py [--nsamples 32 --seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(kind: str, method: str, out: Path, args: argparse.Namespace, batch_size: int | None = None) -> dict:
    batch = args.batch_size if batch_size is None else batch_size
    prune = ["prune", MODEL, "--method", method, "--uniform", "-s", "0.5", "--nsamples", str(args.nsamples),
             "--seqlen", str(args.seqlen), "--batch-size", str(batch), "--device", "cpu", "-o", str(out),
             "--json", "-q"]
    if kind == "plain":
        cmd = [sys.executable, "-m", "owlctl", *prune]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", kind, "-m",
               "owlctl", *prune]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load_before, cpu0, t0 = os.getloadavg(), _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        raise SystemExit(f"{kind} {method} failed:\n{r.stderr[-4000:]}")
    doc = json.loads(r.stdout)
    sec = doc["seconds"]
    return {"processes": kind, "method": method, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "owlctl_total_s": sec["total"], "collectives_s": sec.get("collectives"),
            "collectives_fraction": round(sec["collectives"] / sec["total"], 4) if "collectives" in sec else None,
            "seconds": sec, "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def compare(a: Path, b: Path) -> dict:
    """Masks, per-row pruned counts and weights of two checkpoints (every tensor of the weight files)."""
    import torch
    from safetensors.torch import load_file

    def tensors(p: Path) -> dict:
        out: dict = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = tensors(a), tensors(b)
    total = agree = rows = rows_same = 0
    max_diff = 0.0
    identical = True
    for name, t in x.items():
        u = y[name]
        total += t.numel()
        agree += int(((t == 0) == (u == 0)).sum())
        if t.dim() == 2:
            rows += t.shape[0]
            rows_same += int(((t == 0).sum(dim=1) == (u == 0).sum(dim=1)).sum())
        if not torch.equal(t, u):
            identical = False
            max_diff = max(max_diff, float((t.float() - u.float()).abs().max()))
    blocks: dict[int, list[int]] = {}
    for name, t in x.items():
        parts = name.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            acc = blocks.setdefault(int(parts[parts.index("layers") + 1]), [0, 0])
            acc[0] += int(((t == 0) == (y[name] == 0)).sum())
            acc[1] += t.numel()
    return {"per_block_mask_agreement": [round(a / n, 6) for _i, (a, n) in sorted(blocks.items())],
            "mask_agreement": agree / total, "mask_positions_differing": total - agree,
            "rows_with_equal_pruned_count": f"{rows_same}/{rows}", "weights_bit_identical": identical,
            "max_abs_weight_difference": max_diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--plain-for", default="sparsegpt", help="methods also run without the launcher (wanda's plain "
                    "result equals the launched one bit for bit in tests/engine/test_distributed.py)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_distributed.json"))
    ap.add_argument("--noise-floor", action="store_true", help="instead: plain sparsegpt at --batch-size B and B/2 "
                    "(float32 rounding alone) and launched with 2 processes, per-block mask agreement, into "
                    "docs/bench_distributed_noise.json")
    args = ap.parse_args()
    if args.noise_floor:
        return noise_floor(args)
    rows, checks = [], {}
    work = Path(tempfile.mkdtemp(prefix="owlctl-bench-dist-"))
    try:
        for method in args.methods.split(","):
            outs = {}
            kinds = ("plain", "1", "2") if method in args.plain_for.split(",") else ("1", "2")
            for kind in kinds:
                outs[kind] = work / f"{method}-{kind}"
                rows.append(run(kind, method, outs[kind], args))
                print(json.dumps(rows[-1]), file=sys.stderr)
            checks[method] = {"torchrun 1 vs 2": compare(outs["1"], outs["2"])}
            if "plain" in outs:
                checks[method]["plain vs torchrun 2"] = compare(outs["plain"], outs["2"])
            for p in outs.values():
                shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["method"], r["processes"]): r for r in rows}
    ratios = {m: {"wall_2_over_1": round(by[(m, "2")]["wall_s"] / by[(m, "1")]["wall_s"], 3),
                  "owlctl_total_2_over_1": round(by[(m, "2")]["owlctl_total_s"] / by[(m, "1")]["owlctl_total_s"], 3)}
              for m in args.methods.split(",")}
    doc = {"model": MODEL, "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                           "batch_size": args.batch_size},
           "threads_per_process": 1, "cpus": os.cpu_count(), "runs": rows, "ratios": ratios, "equality": checks}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("| method | processes | wall s | owlctl total s | collectives s (fraction) | CPU s | load before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        frac = "-" if r["collectives_s"] is None else f"{r['collectives_s']:.1f} ({r['collectives_fraction']:.1%})"
        print(f"| {r['method']} | {r['processes']} | {r['wall_s']:.1f} | {r['owlctl_total_s']:.1f} | {frac} | "
              f"{r['cpu_s']:.1f} | {r['load_before'][0]:.2f} |")
    print(json.dumps({"ratios": ratios, "equality": checks}, indent=2))


def noise_floor(args: argparse.Namespace) -> None:
    """How far SparseGPT's masks move under float32 rounding alone: one plain process at two batch sizes
    (the same sequences, other batch shapes and accumulation order), and the 2-process run against both."""
    work = Path(tempfile.mkdtemp(prefix="owlctl-bench-dist-noise-"))
    half = max(1, args.batch_size // 2)
    try:
        outs = {"plain": work / "plain", "plain_half_batch": work / "half", "2": work / "two"}
        rows = [run("plain", "sparsegpt", outs["plain"], args), run("plain", "sparsegpt", outs["plain_half_batch"],
                                                                     args, half),
                run("2", "sparsegpt", outs["2"], args)]
        checks = {f"plain batch {args.batch_size} vs plain batch {half}": compare(outs["plain"],
                                                                                   outs["plain_half_batch"]),
                  "plain vs torchrun 2": compare(outs["plain"], outs["2"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"model": MODEL, "method": "sparsegpt", "runs": rows, "equality": checks}
    Path(ROOT / "docs" / "bench_distributed_noise.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
