"""`owlctl bench`: prefill/decode throughput, step latency and memory; dense vs sparse side by side."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Benchmark prefill and decode speed, per-step latency and memory; dense vs sparse in one run.

A prompt of --prompt-len random tokens (x --batch-size) is prefilled, then --new-tokens greedy decode steps
run through the KV cache. Warm-up runs are excluded; tokens/s is the median of --runs (>= 3) runs, and
p50/p90/p99 pool every timed decode step. Each row checks its first logits against PyTorch's dense forward.
The model is loaded whole into memory (a benchmark of a model that does not fit would measure the disk).

\b
Backends:
  torch         PyTorch's dense kernels (CPU or CUDA).
  torch-sparse  owlctl's sparse CPU kernels (nonzeros + bitmask; AVX-512, AVX2
                or portable C, --threads threads) beside a dense-kernel row; on
                CUDA, 2:4 checkpoints through torch.sparse.to_sparse_semi_structured.
  onnxruntime   the model's ONNX export (made once, cached) on onnxruntime.
  deepsparse    DeepSparse 1.8.0 in its own venv; --cpu is short for it and
                --setup creates the venv.
\b
Examples:
  owlctl bench wanda70 --backend torch-sparse
  owlctl bench builtin:smollm2-135m --sparse wanda70 --backend onnxruntime --json
  owlctl bench --cpu --setup && owlctl bench builtin:smollm2-135m --sparse wanda70 --cpu
"""


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _mib(r: dict, key: str) -> str:
    b = r.get("bandwidth")
    return "-" if not b else f"{b[key] / 2**20:.1f}"


def _rate(r: dict, which: str) -> str:
    b = r.get("bandwidth")
    if not b:
        return "-"
    frac = b.get(f"{which}_fraction_of_probe")
    return f"{b[f'{which}_gb_per_s']:.2f}" + (f" ({frac:.0%})" if frac is not None else "")


def render(doc: dict) -> None:
    """One column per benchmarked row (dense, sparse), one line per metric: fits an 80-column terminal."""
    from rich.table import Table

    s = doc["settings"]
    rows = doc["rows"]
    t = Table(title=f"bench: prompt {s['prompt_len']}, {s['new_tokens']} decode steps, batch {s['batch_size']}, "
                    f"{s['threads']} thread(s), median of {s['runs']} runs", title_justify="left")
    t.add_column("")
    for r in rows:
        t.add_column(r["label"], justify="right")

    def line(name: str, fn) -> None:
        t.add_row(name, *[fn(r) for r in rows])

    line("model", lambda r: r["model"]["spec"])
    line("backend", lambda r: r["backend"] + (f" ({r['kernel']})" if r.get("kernel") else ""))
    line("prunable sparsity", lambda r: "-" if r["model"].get("prunable_sparsity") is None
         else f"{r['model']['prunable_sparsity']:.1%}")
    line("prefill tok/s", lambda r: _fmt(r["prefill"]["tokens_per_s"]))
    line("decode tok/s", lambda r: _fmt(r["decode"]["tokens_per_s"], ".2f"))
    for q in ("p50", "p90", "p99"):
        line(f"decode step {q} ms", lambda r, q=q: _fmt(r["decode"]["step_ms"][q], ".2f"))
    line("Linear weights MiB/step", lambda r: _mib(r, "linear_bytes_per_step"))
    line("Linear GB/s (of probe)", lambda r: _rate(r, "linear"))
    line("model weights MiB/step", lambda r: _mib(r, "model_bytes_per_step"))
    line("model GB/s (of probe)", lambda r: _rate(r, "model"))
    line("peak RSS MiB", lambda r: _fmt(r["memory"].get("peak_rss_mb"), ".0f"))
    line("max |logits - torch|", lambda r: "-" if r.get("max_abs_diff_vs_torch") is None
         else f"{r['max_abs_diff_vs_torch']:.2g}")
    console.out.print(t)
    p = doc.get("read_bandwidth")
    if p:
        console.out.print(f"read bandwidth (probe, {p['threads']} thread(s)): {p['gb_per_s']:.1f} GB/s"
                          if p.get("gb_per_s") else f"read bandwidth: not measured ({p.get('skipped')})",
                          highlight=False)
    c = doc.get("comparison")
    if c:
        console.out.print(f"{c['candidate']} / {c['baseline']}: decode x{_fmt(c['decode_speedup'], '.2f')}, "
                          f"prefill x{_fmt(c['prefill_speedup'], '.2f')}", highlight=False)


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.deploy.eol import deepsparse_host
    from owlctl.errors import InputError
    from owlctl.ops import bench as bench_ops

    if cfg.model is None:
        if not cfg.setup:
            raise InputError("MODEL is required", hint="e.g. `owlctl bench builtin:smollm2-135m`")
        console.log(f"setting up DeepSparse in {deepsparse_host.deepsparse_venv()} (a few minutes)")
        info = deepsparse_host.setup_deepsparse(log=console.log)
        if json_out:
            console.print_json(info)
        else:
            console.out.print(f"DeepSparse {info['deepsparse']} ready: {info['python']}", highlight=False)
        return
    if cfg.setup:
        console.log(f"setting up DeepSparse in {deepsparse_host.deepsparse_venv()} (a few minutes)")
    doc = bench_ops.bench(cfg, progress=console.Progress())
    if json_out:
        console.print_json(doc)
    else:
        render(doc)
    check = doc["logits_check"]
    if not check["ok"]:
        bad = ", ".join(f"{r['label']} ({r['backend']}): {r['max_abs_diff']:.3g} > {r['tolerance']:g}"
                        for r in check["rows"] if not r["ok"])
        raise InputError(f"logits differ from PyTorch's dense forward beyond the tolerance: {bad}; the speed of "
                         "a wrong answer is not a result", hint="a broken kernel or runtime; report it (the "
                         "numbers are above), or raise --tolerance if the difference is expected")


def register(app: typer.Typer) -> None:
    from owlctl.ops.bench import BenchConfig

    command(app, "bench", BenchConfig, _body, help=HELP)
