"""`owlctl bench`: prefill and decode speed, step latency and memory, dense vs sparse in one run.

Each row of the result runs one model on one backend: a prompt of ``prompt_len`` random tokens (batch
``batch_size``) is prefilled, then ``new_tokens`` greedy decode steps each feed one token through the KV
cache. Warm-up runs are excluded; the reported speed is the median over ``runs`` timed runs, latency
percentiles pool every timed decode step. Every row also checks its first-token logits against PyTorch's
dense forward of the same weights (``max_abs_diff_vs_torch``).

Rows: MODEL on the backend; with ``sparse`` also that model. ``torch-sparse`` always pairs a dense-kernel
(``torch``) row with the sparse-kernel row: ``bench PRUNED --backend torch-sparse`` compares a pruned
checkpoint against its own dense-kernel run, ``bench DENSE --sparse PRUNED --backend torch-sparse`` the
dense model against the pruned one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError, ModelError
from owlctl.options import DEVICE, DTYPE, Backend, SparseKernel, arg, opt

BACKENDS = Backend.values()


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str | None = arg("Model: checkpoint or packed directory, ONNX export (onnxruntime/deepsparse), HF id, "
                            "builtin:...")(None)
    sparse: str | None = opt("--sparse", help="A second (pruned) model benchmarked beside MODEL; the ratio is "
                             "sparse / MODEL.")(None)
    backend: str = opt("--backend", help="Runtime to measure (see above).", choices=Backend)("torch")
    cpu: bool = opt("--cpu", help="Short for --backend deepsparse (the reference's CPU path).")(False)
    setup: bool = opt("--setup", help="deepsparse: create the DeepSparse venv in the owlctl cache (pip, PyPI) "
                      "first.")(False)
    deepsparse_python: Path | None = opt("--deepsparse-python", help="deepsparse: the python of an existing "
                                         "DeepSparse 1.8.0 environment.")(None)
    prompt_len: int = opt("--prompt-len", help="Prompt tokens per sequence.", min=1)(128)
    new_tokens: int = opt("--new-tokens", help="Decode steps (one token each).", min=1)(32)
    batch_size: int = opt("--batch-size", help="Sequences decoded together.", min=1)(1)
    runs: int = opt("--runs", help="Timed runs (>= 3); the median is reported.", min=3)(3)
    warmup: int = opt("--warmup", help="Untimed warm-up runs per row.", min=0)(1)
    threads: int = opt("--threads", help="CPU threads (torch, onnxruntime, DeepSparse cores, and owlctl's sparse "
                       "kernels).", min=1)(1)
    sparse_kernel: str = opt("--sparse-kernel", help="torch-sparse: bitmask (best ISA for this CPU), "
                             "bitmask-ISA (forced), csr (the old name of bitmask-portable), torch-csr, torch-bsr.",
                             choices=SparseKernel)("auto")
    seed: int = opt("--seed", help="Seed of the random prompt.")(0)
    probe: bool = opt("--probe/--no-probe", help="Measure the machine's read bandwidth (a ~0.5 s STREAM-like "
                      "probe at --threads) so each row's GB/s can be read as a fraction of it.")(True)
    tolerance: float | None = opt("--tolerance", help="Largest allowed |logits - PyTorch dense| per row; above it "
                                  "bench fails (exit 1). Default: 1e-3 for float32 weights, 0.1 for 16-bit.",
                                  min=0.0)(None)
    device: str = DEVICE("cpu")
    dtype: str = DTYPE("auto")

    def __post_init__(self) -> None:
        if self.cpu:
            if self.backend not in ("torch", "deepsparse"):
                raise InputError(f"--cpu means --backend deepsparse; it conflicts with --backend {self.backend}")
            object.__setattr__(self, "backend", "deepsparse")
        if self.setup and self.backend != "deepsparse":
            raise InputError("--setup prepares DeepSparse; use it with --cpu (or --backend deepsparse)")


# ---------------------------------------------------------------------------------------------- helpers


def _check_context(spec: str, cfg: BenchConfig) -> dict:
    from owlctl.engine.models import model_config
    from owlctl.ops.checks import context_length

    config, _ = model_config(spec)
    ctx = context_length(config)
    need = cfg.prompt_len + cfg.new_tokens
    if ctx is not None and need > ctx:
        raise InputError(f"--prompt-len {cfg.prompt_len} + --new-tokens {cfg.new_tokens} = {need} tokens exceeds "
                         f"the context of {spec} ({ctx} positions)",
                         hint=f"use a prompt and generation that fit in {ctx} tokens")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dtype = text.get("dtype") or text.get("torch_dtype")
    if not isinstance(text.get("vocab_size"), int):
        raise ModelError(f"the config of {spec} has no vocab_size", hint="the model directory may be incomplete")
    return {"context_length": ctx, "vocab_size": int(text["vocab_size"]), "dtype": dtype}


# Largest |logits - PyTorch dense| a backend may show before its row is a failure (a fast wrong answer is a
# failure): float32 kernels differ from PyTorch only in summation order; 16-bit weights round more.
TOLERANCE = {"float32": 1e-3, "16-bit": 1e-1}


def logits_check(rows: list[dict], meta: dict, cfg: BenchConfig) -> dict:
    """Every row's first-token logits against PyTorch's dense forward of the same weights."""
    out = []
    for r in rows:
        dtype = cfg.dtype if cfg.dtype != "auto" else meta.get(r["model"]["spec"], {}).get("dtype")
        tol = cfg.tolerance if cfg.tolerance is not None else (
            TOLERANCE["float32"] if dtype in (None, "float32", "fp32") else TOLERANCE["16-bit"])
        d = r.get("max_abs_diff_vs_torch")
        ok = d is None or d <= tol  # NaN fails too
        out.append({"label": r["label"], "backend": r["backend"], "max_abs_diff": d, "tolerance": tol, "ok": ok})
    return {"ok": all(x["ok"] for x in out), "rows": out,
            "definition": "max |first-token logits - PyTorch dense logits of the same weights|"}


PROBE_BYTES = 512 << 20  # several times a large last-level cache; ~35 ms per pass at 15 GB/s


def read_probe(cfg: BenchConfig) -> dict | None:
    """The read bandwidth of ``cfg.threads`` threads (owlctl's probe), or why it was not measured."""
    import os

    if not cfg.probe:
        return None
    if cfg.device != "cpu":
        return {"gb_per_s": None, "skipped": "the probe measures host memory; --device is not cpu"}
    from owlctl.deploy.kernels import build, probe

    ok, why = build.available()
    if not ok:
        return {"gb_per_s": None, "skipped": why}
    load = os.getloadavg()[0]
    res = probe.read_bandwidth(PROBE_BYTES, threads=cfg.threads, reps=3)
    return {"gb_per_s": res["best_bytes_per_s"] / 1e9, "bytes": res["bytes"], "threads": res["threads"],
            "isa": res["isa"], "seconds": res["seconds"], "load_average_1m": load,
            "statistic": "best of 3 passes after a warm-up pass"}


# ---------------------------------------------------------------------------------------------- driver


def _validate(cfg: BenchConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}", hint="use one of: " + ", ".join(BACKENDS))
    if cfg.runs < 3:
        raise InputError(f"--runs must be >= 3 (the median of at least three runs is reported), got {cfg.runs}")
    if cfg.prompt_len < 1 or cfg.new_tokens < 1 or cfg.batch_size < 1 or cfg.warmup < 0 or cfg.threads < 1:
        raise InputError("--prompt-len, --new-tokens, --batch-size and --threads must be >= 1, --warmup >= 0")
    if cfg.device != "cpu" and cfg.backend in ("onnxruntime", "deepsparse"):
        raise InputError(f"--backend {cfg.backend} runs on the CPU", hint="drop --device, or use --backend torch")


def _plan(cfg: BenchConfig) -> list[tuple[str, str, str, str | None]]:
    """(label, model spec, backend, kernel) per row."""
    if cfg.backend == "torch-sparse":
        sparse_spec = cfg.sparse or cfg.model
        return [("dense", cfg.model, "torch", None), ("sparse", sparse_spec, "torch-sparse", cfg.sparse_kernel)]
    rows = [("dense" if cfg.sparse else "model", cfg.model, cfg.backend, None)]
    if cfg.sparse:
        rows.append(("sparse", cfg.sparse, cfg.backend, None))
    return rows


def bench(cfg: BenchConfig, progress: Any = None) -> dict:
    """Benchmark and return one ``owlctl.bench`` document (rows, the comparison, the logits check)."""
    import time

    import torch

    from owlctl.deploy.measure import with_probe
    from owlctl.engine.models import describe, resolve_device
    from owlctl.formats._io import header

    t0 = time.perf_counter()
    _validate(cfg)
    if cfg.device != "cpu":
        resolve_device(cfg.device)
    py, setup_info = _deepsparse(cfg)
    plan = _plan(cfg)
    meta = _models(cfg, plan)
    vocab = min(m["vocab_size"] for m in meta.values())
    prompt = torch.randint(0, vocab, (cfg.batch_size, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        probe = read_probe(cfg)
        rows = _rows(cfg, plan, prompt, py, progress)
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    with_probe(rows, probe)
    settings = {"backend": cfg.backend, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
                "batch_size": cfg.batch_size, "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads,
                "torch_num_threads": torch_threads, "device": cfg.device, "dtype": cfg.dtype,
                "sparse_kernel": cfg.sparse_kernel if cfg.backend == "torch-sparse" else None,
                "seed": cfg.seed, "prompt": "random token ids (seeded)", "decode": "greedy, KV cache",
                "statistic": "median over runs; step percentiles pool all timed steps"}
    return {**header("bench", "bench", describe(cfg.model),
                     {"total": round(time.perf_counter() - t0, 3)}),
            "settings": settings, "host": _host(cfg), "models": meta, "rows": rows, "comparison": _comparison(rows),
            "logits_check": logits_check(rows, meta, cfg), "read_bandwidth": probe,
            **({"deepsparse_setup": setup_info} if setup_info else {})}


def _deepsparse(cfg: BenchConfig) -> tuple[Any, Any]:
    """DeepSparse's interpreter (set up first with --setup), checked before any work; (None, None) otherwise."""
    if cfg.backend != "deepsparse":
        return None, None
    from owlctl.deploy.eol import deepsparse_host

    setup_info = deepsparse_host.setup_deepsparse() if cfg.setup else None
    return deepsparse_host.deepsparse_python(cfg.deepsparse_python), setup_info


def _models(cfg: BenchConfig, plan: list) -> dict:
    from owlctl.deploy.onnx import is_onnx_export

    meta = {}
    for _label, spec, _b, _k in plan:
        if is_onnx_export(spec) and cfg.backend in ("torch", "torch-sparse"):
            raise InputError(f"{spec} is an ONNX export; the torch backends need a model directory",
                             hint="pass the checkpoint, or use --backend onnxruntime / deepsparse")
        meta[spec] = _check_context(spec, cfg)
    return meta


def _rows(cfg: BenchConfig, plan: list, prompt: Any, py: Any, progress: Any) -> list[dict]:
    from owlctl.deploy.eol.deepsparse_row import row_deepsparse
    from owlctl.deploy.runtimes.onnxruntime import row_onnxruntime
    from owlctl.deploy.runtimes.torch import row_torch
    from owlctl.progress import task as progress_task

    rows = []
    with progress_task(progress, "bench", len(plan) * (cfg.warmup + cfg.runs)) as task:
        for label, spec, backend, kernel in plan:
            if backend in ("torch", "torch-sparse"):
                rows.append(row_torch(spec, cfg, prompt, kernel, task, label))
            elif backend == "onnxruntime":
                rows.append(row_onnxruntime(spec, cfg, prompt, task, label))
            else:
                rows.append(row_deepsparse(spec, cfg, prompt, task, label, py))
    return rows


def _comparison(rows: list[dict]) -> dict | None:
    from owlctl.deploy.measure import ratio

    if len(rows) != 2:
        return None
    d, s = rows
    return {"baseline": d["label"], "candidate": s["label"],
            "decode_speedup": ratio(s["decode"]["tokens_per_s"], d["decode"]["tokens_per_s"]),
            "prefill_speedup": ratio(s["prefill"]["tokens_per_s"], d["prefill"]["tokens_per_s"]),
            "p50_step_latency_ratio": ratio(s["decode"]["step_ms"]["p50"], d["decode"]["step_ms"]["p50"])}


def _host(cfg: BenchConfig) -> dict:
    import platform

    import torch

    from owlctl.deploy.eol.deepsparse_host import cpu_info

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "onnxruntime", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {"cpu": cpu_info(), "platform": platform.platform(), "versions": versions,
            "cuda": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None}
