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
  isa      decode with each ISA variant forced (avx512vbmi2 / avx512 / avx2 / portable), 1 thread;
  e2e      whole models through `owlctl bench` (``--e2e NAME=CHECKPOINT``, repeatable): torch dense vs
           torch-sparse rows, and onnxruntime (dense) for float32 checkpoints, at 1 and 2 threads, plus
           where a torch-sparse decode step's time goes (sparse Linears / dense Linears such as a tied
           lm_head / everything else) at 1 thread.
Every sparse output is checked against the dense one (max |diff| / max |dense|). Sections not run keep
their previous results from the JSON. Writes docs/bench_kernels.json and docs/bench_kernels.md.
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
WAIT_QUIET = True  # wait for other processes to leave the CPUs before each section (--no-wait)


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


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used since boot, CPU seconds this process has used)."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait
    return busy / ticks, time.process_time()


def other_cpu(seconds: float = 1.0) -> float:
    """CPUs' worth of time other processes used over the next `seconds`."""
    b0, s0 = busy_seconds()
    time.sleep(seconds)
    b1, s1 = busy_seconds()
    return max(0.0, (b1 - b0) - (s1 - s0)) / seconds


def wait_quiet(limit: float = 0.2, max_wait: float = 300.0) -> float:
    """Wait (up to max_wait) until other processes use less than `limit` CPUs; returns the last reading."""
    t0, use = time.perf_counter(), other_cpu()
    while use > limit and time.perf_counter() - t0 < max_wait:
        print(f"  waiting: other processes use {use:.2f} CPUs", file=sys.stderr, flush=True)
        use = other_cpu(5.0)
    return use


class Section:
    """Load average, this process's CPU time and the CPU time of every other process around a block of
    measurements (the machine is shared: the last says whether anything else ran meanwhile)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "Section":
        self.quiet_before = wait_quiet() if WAIT_QUIET else None
        self.load0, self.wall0 = os.getloadavg()[0], time.perf_counter()
        self.busy0, self.cpu0 = busy_seconds()
        print(f"[{self.name}] load {self.load0:.2f}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, cpu1 = busy_seconds()
        wall = time.perf_counter() - self.wall0
        self.info = {"loadavg_1min_before": self.load0, "loadavg_1min_after": os.getloadavg()[0],
                     "cpu_seconds": cpu1 - self.cpu0, "wall_seconds": wall,
                     "other_cpus": max(0.0, (busy1 - self.busy0) - (cpu1 - self.cpu0)) / max(wall, 1e-9),
                     "other_cpus_before": self.quiet_before}


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
                         "bytes_ratio": (sb + io) / (dense_bytes + io),
                         "dense_gbps": (dense_bytes + io) / dense_s / 1e9,
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


def e2e_row(name: str, bench_doc: dict, threads: int) -> list[dict]:
    """One summary row per `owlctl bench` document row."""
    out = []
    for r in bench_doc["rows"]:
        out.append({"model": name, "threads": threads, "label": r["label"], "backend": r["backend"],
                    "kernel": r.get("kernel"), "decode_tok_s": r["decode"]["tokens_per_s"],
                    "decode_tok_s_runs": r["decode"]["tokens_per_s_runs"],
                    "prefill_tok_s": r["prefill"]["tokens_per_s"], "weights_mb": r["memory"].get("weights_mb"),
                    "max_abs_diff_vs_torch": r["max_abs_diff_vs_torch"],
                    "settings": {k: bench_doc["settings"][k] for k in ("prompt_len", "new_tokens", "runs")},
                    "sparse": (r.get("details") or {}).get("sparse")})
    return out


def run_e2e(models: dict[str, str], threads_list=(1, 2)) -> list[dict]:
    from owlctl.ops.bench import BenchConfig, bench

    rows = []
    for name, path in models.items():
        cfg = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
        dtype = cfg.get("torch_dtype") or cfg.get("dtype")
        backends = ["torch-sparse"] + (["onnxruntime"] if dtype in (None, "float32") else [])
        new_tokens = 16 if cfg.get("hidden_size", 0) >= 1024 else 32  # large models: fewer steps
        for threads in threads_list:
            for backend in backends:
                with Section(f"e2e {name} {backend} {threads}t") as sec:
                    doc = bench(BenchConfig(model=path, backend=backend, threads=threads, new_tokens=new_tokens))
                for r in e2e_row(name, doc, threads):
                    rows.append({**r, **sec.info})
        rows.append({"model": name, "threads": 1, "label": "breakdown", **step_breakdown(path)})
    return rows


def step_breakdown(path: str, steps: int = 16) -> dict:
    """ms per torch-sparse decode step in sparse Linears, other (dense) Linears, and the rest, 1 thread."""
    from owlctl.engine.models import load_model

    torch.set_num_threads(1)
    model, _tok, _info = load_model(path)
    kl.sparsify(model, "auto", threads=1)
    spent = {"sparse_linears": 0.0, "dense_linears": 0.0}

    def timed(mod, key):
        inner = mod.forward

        def forward(*a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            spent[key] += time.perf_counter() - t
            return out
        mod.forward = forward

    for mod in model.modules():
        if isinstance(mod, kl.SparseLinear):
            timed(mod, "sparse_linears")
        elif isinstance(mod, torch.nn.Linear):
            timed(mod, "dense_linears")
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for k in spent:
            spent[k] = 0.0
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        wall = (time.perf_counter() - t) / steps
    ms = {k: v / steps * 1e3 for k, v in spent.items()}
    return {"step_ms": wall * 1e3, **{f"{k}_ms": v for k, v in ms.items()},
            "rest_ms": wall * 1e3 - sum(ms.values()), "loadavg_1min": os.getloadavg()[0]}


def render_e2e(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## End to end: `owlctl bench CKPT --backend torch-sparse|onnxruntime --threads T`", "",
             "Prompt 128 random tokens, then greedy decode (32 steps for SmolLM2, 16 for the 1.1B model), median "
             "of 3 runs after a warm-up; the torch-sparse command also runs the dense PyTorch row. Speed-up = "
             "torch-sparse decode tok/s over the fastest dense runtime at the same thread count.", "",
             "| model | threads | torch dense tok/s | onnxruntime tok/s | torch-sparse tok/s | vs fastest dense | "
             "prefill tok/s dense / sparse | max abs diff (logits) | other CPUs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        for threads in (1, 2):
            sel = [r for r in rows if r["model"] == model and r["threads"] == threads and r["label"] != "breakdown"]
            dense = next((r for r in sel if r["backend"] == "torch"), None)
            sparse = next((r for r in sel if r["backend"] == "torch-sparse"), None)
            ort = next((r for r in sel if r["backend"] == "onnxruntime"), None)
            if not dense or not sparse:
                continue
            best = max(dense["decode_tok_s"], ort["decode_tok_s"] if ort else 0.0)
            load = max(r.get("other_cpus", float("nan")) for r in sel)
            ort_s = f"{ort['decode_tok_s']:.2f}" if ort else "-"
            lines.append(f"| {model} | {threads} | {dense['decode_tok_s']:.2f} | {ort_s} | "
                         f"{sparse['decode_tok_s']:.2f} | **{sparse['decode_tok_s'] / best:.2f}x** | "
                         f"{dense['prefill_tok_s']:.0f} / {sparse['prefill_tok_s']:.0f} | "
                         f"{sparse['max_abs_diff_vs_torch']:.1e} | {load:.2f} |")
    bd = [r for r in rows if r["label"] == "breakdown"]
    if bd:
        lines += ["", "Where a torch-sparse decode step goes (1 thread, ms per step):", "",
                  "| model | step | sparse Linears | dense Linears (lm_head) | rest (attention, norms, Python) |",
                  "|---|---:|---:|---:|---:|"]
        for r in bd:
            lines.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['sparse_linears_ms']:.1f} | "
                         f"{r['dense_linears_ms']:.1f} | {r['rest_ms']:.1f} |")
    return lines


def render(doc: dict) -> str:
    m, p = doc["machine"], doc["probe"]
    lines = [
        "# owlctl sparse kernels: per-matrix speed (`benchmarks/bench_kernels.py`)",
        "",
        f"Machine: {m.get('cpu')} ({m['logical_cpus']} logical CPUs, shared with other jobs), torch {m['torch']}, "
        f"best kernel ISA `{m['kernel_isa_best']}`. Random {SPARSITY:.0%}-sparse matrices. Medians of "
        f"{doc['reps']} interleaved repetitions. Before each section the script waits until other processes use "
        "< 0.2 CPUs; 'other CPUs' is what they used during it (CPUs' worth; the JSON also has load averages "
        "and this process's CPU seconds).",
        "",
        f"Read bandwidth (probe, 1 GiB): **{p['gbps'][1]:.1f} GB/s at 1 thread, {p['gbps'][2]:.1f} GB/s at 2** "
        f"(load {p['loadavg_1min_before']:.1f}-{p['loadavg_1min_after']:.1f}).",
        "",
        "## Decode (T = 1), cold weights",
        "",
        "| shape (out x in) | dtype | threads | dense us | sparse us | speed-up | bytes sparse/dense | "
        "sparse GB/s | % of probe | probe GB/s | dense GB/s | rel diff | other CPUs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["decode"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['threads']} | {r['dense_us']:.0f} | "
                     f"{r['sparse_us']:.0f} | {r['speedup']:.2f} | {r['bytes_ratio']:.3f} | {r['sparse_gbps']:.1f} | "
                     f"{r['pct_of_probe']:.0f}% | {r['probe_gbps_near']:.1f} | {r['dense_gbps']:.1f} | "
                     f"{r['rel_diff']:.1e} | {r['other_cpus']:.2f} |")
    lines += ["", "## Prefill", "",
              "| shape | dtype | T | threads | route | dense ms | sparse ms | speed-up | rel diff | other CPUs |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["prefill"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['tokens']} | {r['threads']} | "
                     f"{r['route']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f} | "
                     f"{r['rel_diff']:.1e} | {r['other_cpus']:.2f} |")
    lines += ["", "## Decode with each ISA variant forced (1 thread)", "",
              "| shape | dtype | ISA | sparse us | dense us | speed-up | sparse GB/s | % of probe (near) |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["isa"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['isa']} | {r['sparse_us']:.0f} | "
                     f"{r['dense_us']:.0f} | {r['speedup']:.2f} | {r['sparse_gbps']:.1f} | "
                     f"{r['pct_of_probe']:.0f}% |")
    lines += render_e2e(doc.get("e2e", []))
    notes = doc.get("notes")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 repetitions, no T=2048, LLaMA shapes only 4096x4096")
    ap.add_argument("--sections", default="probe,decode,prefill,isa")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_kernels")
    ap.add_argument("--e2e", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="models for the e2e section (e.g. smollm2-135m-mag70=/tmp/mag70)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine before sections")
    args = ap.parse_args()
    global WAIT_QUIET
    WAIT_QUIET = not args.no_wait
    reps = 3 if args.quick else args.reps
    sections = args.sections.split(",")
    shapes = SMOL + (LLAMA7B[:1] if args.quick else LLAMA7B)
    old_path = args.out.with_suffix(".json")
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    doc: dict = {"schema": "owlctl.bench_kernels/1", "machine": machine(), "reps": reps, "sparsity": SPARSITY,
                 "probe": {}, "decode": [], "prefill": [], "isa": [], "e2e": []}
    for key in ("probe", "decode", "prefill", "isa", "e2e", "notes"):  # sections not run keep their results
        if key not in sections and key in old:
            doc[key] = old[key]
    if "probe" in sections:
        doc["probe"] = run_probe(reps)
    elif not doc["probe"]:
        doc["probe"] = {"gbps": {1: float("nan"), 2: float("nan")}, "loadavg_1min_before": float("nan"),
                        "loadavg_1min_after": float("nan")}
    doc["probe"]["gbps"] = {int(k): v for k, v in doc["probe"]["gbps"].items()}  # JSON keys are strings
    def save() -> str:  # after every section: a crash or an interruption keeps what was measured
        doc["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        text = render(doc)
        args.out.with_suffix(".md").write_text(text)
        return text

    save()
    if "decode" in sections:
        for shape in shapes:
            for dt in DTYPES:
                doc["decode"] += decode_case(shape, dt, (1, 2), reps)
        save()
    if "prefill" in sections:
        for shape in SMOL + LLAMA7B[:1]:
            for dt in DTYPES:
                for tokens in (128,) if args.quick else (128, 2048):
                    for threads in (1, 2):
                        doc["prefill"].append(prefill_case(shape, dt, tokens, threads, max(3, reps - 2)))
        save()
    if "isa" in sections:
        for shape in (SMOL[1], LLAMA7B[0]):
            for dt in DTYPES:
                doc["isa"] += decode_case(shape, dt, (1,), reps, isas=kl.ISAS[1:])
        save()
    if "e2e" in sections and args.e2e:
        doc["e2e"] = run_e2e(dict(m.split("=", 1) for m in args.e2e))
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
