"""owlctl's sparse kernels against torch's dense F.linear, matrix by matrix, in one run.

    python benchmarks/bench_kernels.py                 # everything, ~10 minutes on 2 cores
    python benchmarks/bench_kernels.py --quick         # fewer repetitions, no T=2048

Sections (each measured side by side: the configurations of a section alternate inside every repetition,
the order flips between repetitions, and the tables report medians with the process CPU time and the
1-minute load average around each section):
  probe    the STREAM-like read-bandwidth probe (1 GiB, best pass of a call) at 1 and 2 threads;
  decode   one token (T = 1) through SmolLM2-135M's and LLaMA-7B's matrix shapes at 70% random sparsity,
           float32 and bfloat16, 1 and 2 threads: sparse kernel vs dense F.linear in the same dtype and the
           same thread count. Each call uses a different copy of the matrix, cycling through enough copies
           (>= 600 MB of dense weights) that nothing is served from the last-level cache, as in a real
           decode step. Bytes moved: the stored matrix (mask + values + row offsets) or the dense weight,
           plus x and y; effective GB/s = bytes / seconds, and % of the probe at the same thread count;
  prefill  T = 128 and 2048 tokens through the SmolLM2 shapes and 4096x4096 (the default route: the sparse
           kernel for float32, torch's GEMM on the densified matrix for 16-bit weights from 32 tokens on);
  isa      decode with each ISA variant forced (avx512vbmi2 / avx512 / avx2 / portable), 1 thread.
Every sparse output is checked against the dense one (max |diff| / max |dense|).
Writes docs/bench_kernels.json and docs/bench_kernels.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from owlctl.deploy.kernels import build, probe
from owlctl.deploy.kernels import linear as kl

ROOT = Path(__file__).resolve().parent.parent
SMOL = [(576, 576), (1536, 576), (576, 1536)]  # (C_out, C_in): q/o, gate/up, down (k/v are 192 x 576)
LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPARSITY = 0.7
COLD_BYTES = 600e6


def machine() -> dict:
    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, StopIteration):
        pass
    lib = build.library()
    info["kernel_isa_best"] = kl.isa_name(int(lib.owl_isa_best()))
    return info


class Section:
    """Load average and process CPU time around a block of measurements."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "Section":
        self.load0, self.cpu0, self.wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        print(f"[{self.name}] load {self.load0:.2f}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.info = {"loadavg_1min_before": self.load0, "loadavg_1min_after": os.getloadavg()[0],
                     "cpu_seconds": time.process_time() - self.cpu0, "wall_seconds": time.perf_counter() - self.wall0}


def sparse_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w *= torch.rand(shape, generator=g) >= SPARSITY
    return w.to(dtype)


def module(w: torch.Tensor, threads: int, isa: str = "auto") -> kl.SparseLinear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight.data = w
    return kl.SparseLinear(lin, threads=threads, isa=isa)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def time_calls(fns: list, reps: int) -> dict:
    """fns: {name: zero-arg callable} run alternately for reps rounds (order flipped each round)."""
    names = list(fns)
    out: dict = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def run_probe(reps: int) -> dict:
    res: dict = {1: [], 2: []}
    with Section("probe") as sec:
        for r in range(reps):
            for t in (1, 2) if r % 2 == 0 else (2, 1):
                res[t].append(probe.read_bandwidth(1 << 30, threads=t, reps=3)["best_bytes_per_s"])
    return {"gbps": {t: statistics.median(v) / 1e9 for t, v in res.items()},
            "gbps_runs": {t: [x / 1e9 for x in v] for t, v in res.items()}, **sec.info}


def decode_case(shape, dtype_name: str, threads_list, reps: int, isas=("auto",)) -> list[dict]:
    dtype = DTYPES[dtype_name]
    dense_bytes = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
    copies = max(2, int(-(-COLD_BYTES // dense_bytes)))
    distinct = [sparse_weight(shape, dtype, seed) for seed in range(min(copies, 3))]
    ws = [distinct[k % len(distinct)].clone() for k in range(copies)]  # separate memory for every call
    built = [module(w, 1) for w in distinct]
    # deep copies (separate buffers), one set per ISA: changing a module's ISA rebinds (and revalidates) it
    mods = {isa: [copy.deepcopy(built[k % len(built)]) for k in range(copies)] for isa in isas}
    x = torch.randn(1, shape[1]).to(dtype)
    io = (shape[0] + shape[1]) * x.element_size()
    sb = built[0].stored_bytes()
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        fns, check = {"dense": lambda: [F.linear(x, w) for w in ws]}, {}
        for isa in isas:
            for m in mods[isa]:
                m.isa, m.threads = isa, threads
            fns[isa] = (lambda ms: lambda: [m(x) for m in ms])(mods[isa])
        with torch.inference_mode():
            for isa in isas:
                fns[isa]()  # warm-up: binds, first touch
                check[isa] = rel_diff(mods[isa][0](x), F.linear(x, distinct[0]))
            fns["dense"]()
            with Section(f"decode {shape} {dtype_name} {threads}t") as sec:
                # the probe right before and after: the shared machine's bandwidth drifts
                near = [probe.read_bandwidth(1 << 30, threads=threads, reps=2)["best_bytes_per_s"] / 1e9]
                times = time_calls(fns, reps)
                near.append(probe.read_bandwidth(1 << 30, threads=threads, reps=2)["best_bytes_per_s"] / 1e9)
        dense_s = statistics.median(times["dense"]) / copies
        for isa in isas:
            s = statistics.median(times[isa]) / copies
            resolved = isa if isa != "auto" else kl.isa_name(int(build.library().owl_isa_best()))
            rows.append({"shape": list(shape), "dtype": dtype_name, "threads": threads, "isa": isa,
                         "resolved_isa": resolved, "copies": copies, "dense_us": dense_s * 1e6, "sparse_us": s * 1e6,
                         "speedup": dense_s / s, "dense_bytes": dense_bytes + io, "sparse_bytes": sb + io,
                         "bytes_ratio": (sb + io) / (dense_bytes + io), "dense_gbps": (dense_bytes + io) / dense_s / 1e9,
                         "sparse_gbps": (sb + io) / s / 1e9, "rel_diff": check[isa],
                         "probe_gbps_near": max(near), "pct_of_probe": 100 * (sb + io) / s / 1e9 / max(near),
                         "runs_dense_s": times["dense"], "runs_sparse_s": times[isa], **sec.info})
    return rows


def prefill_case(shape, dtype_name: str, tokens: int, threads: int, reps: int) -> dict:
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(threads)
    w = sparse_weight(shape, dtype, 0)
    m = module(w, threads)
    x = torch.randn(tokens, shape[1]).to(dtype)
    with torch.inference_mode():
        check = rel_diff(m(x), F.linear(x, w))
        with Section(f"prefill {shape} {dtype_name} T={tokens} {threads}t") as sec:
            times = time_calls({"dense": lambda: F.linear(x, w), "sparse": lambda: m(x)}, reps)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    route = "dense GEMM on the densified matrix" if (m.dense_from_tokens and tokens >= m.dense_from_tokens) \
        else "sparse kernel"
    return {"shape": list(shape), "dtype": dtype_name, "tokens": tokens, "threads": threads, "route": route,
            "dense_ms": d * 1e3, "sparse_ms": s * 1e3, "speedup": d / s,
            "sparse_useful_gflops": 2 * (1 - SPARSITY) * shape[0] * shape[1] * tokens / s / 1e9,
            "dense_gflops": 2 * shape[0] * shape[1] * tokens / d / 1e9, "rel_diff": check,
            "runs_dense_s": times["dense"], "runs_sparse_s": times["sparse"], **sec.info}


def render(doc: dict) -> str:
    m, p = doc["machine"], doc["probe"]
    lines = [
        "# owlctl sparse kernels: per-matrix speed (`benchmarks/bench_kernels.py`)",
        "",
        f"Machine: {m.get('cpu')} ({m['logical_cpus']} logical CPUs, shared with other jobs), torch {m['torch']}, "
        f"best kernel ISA `{m['kernel_isa_best']}`. Random {SPARSITY:.0%}-sparse matrices. Medians of "
        f"{doc['reps']} interleaved repetitions; load average and CPU seconds per section are in the JSON.",
        "",
        f"Read bandwidth (probe, 1 GiB): **{p['gbps'][1]:.1f} GB/s at 1 thread, {p['gbps'][2]:.1f} GB/s at 2** "
        f"(load {p['loadavg_1min_before']:.1f}-{p['loadavg_1min_after']:.1f}).",
        "",
        "## Decode (T = 1), cold weights",
        "",
        "| shape (out x in) | dtype | threads | dense us | sparse us | speed-up | bytes sparse/dense | "
        "sparse GB/s | % of probe | probe GB/s | dense GB/s | rel diff | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["decode"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['threads']} | {r['dense_us']:.0f} | "
                     f"{r['sparse_us']:.0f} | {r['speedup']:.2f} | {r['bytes_ratio']:.3f} | {r['sparse_gbps']:.1f} | "
                     f"{r['pct_of_probe']:.0f}% | {r['probe_gbps_near']:.1f} | {r['dense_gbps']:.1f} | "
                     f"{r['rel_diff']:.1e} | {r['loadavg_1min_before']:.1f} |")
    lines += ["", "## Prefill", "",
              "| shape | dtype | T | threads | route | dense ms | sparse ms | speed-up | rel diff | load |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["prefill"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['tokens']} | {r['threads']} | "
                     f"{r['route']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f} | "
                     f"{r['rel_diff']:.1e} | {r['loadavg_1min_before']:.1f} |")
    lines += ["", "## Decode with each ISA variant forced (1 thread)", "",
              "| shape | dtype | ISA | sparse us | dense us | speed-up | sparse GB/s | % of probe (near) |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["isa"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['isa']} | {r['sparse_us']:.0f} | "
                     f"{r['dense_us']:.0f} | {r['speedup']:.2f} | {r['sparse_gbps']:.1f} | "
                     f"{r['pct_of_probe']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 repetitions, no T=2048, LLaMA shapes only 4096x4096")
    ap.add_argument("--sections", default="probe,decode,prefill,isa")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_kernels")
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps
    sections = args.sections.split(",")
    shapes = SMOL + (LLAMA7B[:1] if args.quick else LLAMA7B)
    doc: dict = {"schema": "owlctl.bench_kernels/1", "machine": machine(), "reps": reps, "sparsity": SPARSITY,
                 "probe": {}, "decode": [], "prefill": [], "isa": []}
    doc["probe"] = run_probe(reps) if "probe" in sections else {
        "gbps": {1: float("nan"), 2: float("nan")}, "loadavg_1min_before": float("nan"),
        "loadavg_1min_after": float("nan")}
    if "decode" in sections:
        for shape in shapes:
            for dt in DTYPES:
                doc["decode"] += decode_case(shape, dt, (1, 2), reps)
    if "prefill" in sections:
        for shape in SMOL + LLAMA7B[:1]:
            for dt in DTYPES:
                for tokens in (128,) if args.quick else (128, 2048):
                    for threads in (1, 2):
                        doc["prefill"].append(prefill_case(shape, dt, tokens, threads, max(3, reps - 2)))
    if "isa" in sections:
        for shape in (SMOL[1], LLAMA7B[0]):
            for dt in DTYPES:
                doc["isa"] += decode_case(shape, dt, (1,), reps, isas=kl.ISAS[1:])
    doc["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    text = render(doc)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
