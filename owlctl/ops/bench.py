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

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from owlctl.errors import InputError, ModelError

BACKENDS = ("torch", "torch-sparse", "onnxruntime", "deepsparse")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    sparse: str | None = None
    backend: str = "torch"
    prompt_len: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    runs: int = 3
    warmup: int = 1
    threads: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    sparse_kernel: str = "auto"
    seed: int = 0
    deepsparse_python: Path | None = None
    setup: bool = False  # deepsparse: create the venv first


# ---------------------------------------------------------------------------------------------- helpers


def _rss_mb(field: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _settle_memory() -> None:
    """Free what can be freed and reset the kernel's peak-RSS counter, so the next row's peak is its own."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _percentiles(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _summarise(runs: list[dict], batch: int, prompt_len: int) -> tuple[dict, dict]:
    pre = [r["prefill_s"] for r in runs]
    dec_tps = [batch * len(r["step_s"]) / sum(r["step_s"]) for r in runs if r["step_s"]]
    steps = [s for r in runs for s in r["step_s"]]
    # medians are the headline; best-of-runs is kept because on a shared machine noise only ever adds time
    prefill = {"tokens": batch * prompt_len, "seconds_median": statistics.median(pre),
               "tokens_per_s": batch * prompt_len / statistics.median(pre),
               "tokens_per_s_best": batch * prompt_len / min(pre), "seconds": pre}
    decode = {"steps": len(runs[0]["step_s"]) if runs else 0,
              "tokens_per_s": statistics.median(dec_tps) if dec_tps else None,
              "tokens_per_s_best": max(dec_tps) if dec_tps else None,
              "tokens_per_s_runs": dec_tps, "step_ms": _percentiles(steps)}
    return prefill, decode


def context_length(config: Any) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _model_dir(spec: str) -> Path:
    from owlctl.engine.loading import local_dir

    return local_dir(spec)[0]


def _check_context(spec: str, cfg: BenchConfig) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(_model_dir(spec)))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {spec}: {e}") from None
    ctx = context_length(config)
    need = cfg.prompt_len + cfg.new_tokens
    if ctx is not None and need > ctx:
        raise InputError(f"--prompt-len {cfg.prompt_len} + --new-tokens {cfg.new_tokens} = {need} tokens exceeds "
                         f"the context of {spec} ({ctx} positions)",
                         hint=f"use a prompt and generation that fit in {ctx} tokens")
    return {"context_length": ctx, "vocab_size": int(config.vocab_size)}


def _prunable_sparsity(model: Any) -> float | None:
    import torch

    from owlctl.families import resolve

    try:
        layout = resolve(model)
    except ModelError:
        return None
    zeros = total = 0
    for i in range(layout.num_blocks):
        for lin in layout.linears(i).values():
            w = lin.weight
            total += w.numel()
            zeros += w.numel() - int(torch.count_nonzero(w))
    return zeros / total if total else None


def _weights_mb(model: Any) -> float:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n / 2**20


# ---------------------------------------------------------------------------------------------- torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def torch_generate(model: Any, ids: Any, steps: int, device: str) -> dict:
    """Prefill ``ids`` then ``steps`` greedy decode steps. Returns times and the first logits (CPU)."""
    import torch

    from owlctl.engine.onnx_export import _cache_kwarg, make_cache

    cache_kw = _cache_kwarg(model)
    cache = make_cache(model.config, [])
    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        _sync(device)
        t_prefill = time.perf_counter() - t
        first = out.logits[:, -1, :].float().cpu()
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            _sync(device)
            step_s.append(time.perf_counter() - t)
    return {"prefill_s": t_prefill, "step_s": step_s, "first_logits": first}


def _timed_runs(fn: Callable[[], dict], cfg: BenchConfig, task: Any, label: str) -> list[dict]:
    for _ in range(cfg.warmup):
        fn()
        task.advance(1, info=f"{label} warm-up")
    runs = []
    for _ in range(cfg.runs):
        runs.append(fn())
        task.advance(1, info=label)
    return runs


def _row_torch(spec: str, cfg: BenchConfig, prompt: Any, kernel: str | None, task: Any, label: str) -> dict:
    import torch

    from owlctl.engine.loading import load_model

    _settle_memory()
    rss0 = _rss_mb()
    t = time.perf_counter()
    model, _tok, info = load_model(spec, cfg.dtype)
    sparsity = _prunable_sparsity(model)
    device = cfg.device
    extra: dict[str, Any] = {}
    reference = None
    if kernel is not None:
        from owlctl.engine import sparse_kernels

        if device.startswith("cuda"):
            model.to(device)
            extra["sparse"] = sparse_kernels.semi_structured(model)
            kernel = extra["sparse"]["kernel"]
        else:
            with torch.inference_mode():  # dense logits of the same weights, before the swap
                reference = model(input_ids=prompt[:1, :16]).logits[0, -1].float()
            extra["sparse"] = sparse_kernels.sparsify(model, kernel, threads=cfg.threads)
            kernel = extra["sparse"]["kernel"]
    else:
        model.to(device)
    load_s = time.perf_counter() - t
    ids = prompt.to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = _timed_runs(lambda: torch_generate(model, ids, cfg.new_tokens, device), cfg, task, label)
    check = None
    if reference is not None:
        with torch.inference_mode():
            got = model(input_ids=prompt[:1, :16]).logits[0, -1].float()
        check = float((got - reference).abs().max())  # the model is freed when this row returns
    memory = {"rss_before_mb": rss0, "peak_rss_mb": _rss_mb("VmHWM"), "weights_mb": _weights_mb(model)}
    if device.startswith("cuda"):
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if kernel is None:
        check = 0.0  # this row is the PyTorch dense reference itself
    return _row(label, spec, info, sparsity, "torch-sparse" if kernel else "torch", kernel, cfg, runs, memory,
                load_s, extra, check_vs_self=check)


def _row(label: str, spec: str, info: Any, sparsity: float | None, backend: str, kernel: str | None,
         cfg: BenchConfig, runs: list[dict], memory: dict, load_s: float, extra: dict,
         check_vs_self: float | None = None) -> dict:
    prefill, decode = _summarise(runs, cfg.batch_size, cfg.prompt_len)
    if memory.get("peak_rss_mb") is not None and memory.get("rss_before_mb") is not None:
        memory["rss_delta_mb"] = memory["peak_rss_mb"] - memory["rss_before_mb"]
    return {"label": label, "model": {"spec": spec, "id": info.id if info else spec,
                                      "prunable_sparsity": sparsity},
            "backend": backend, "kernel": kernel, "prefill": prefill, "decode": decode, "memory": memory,
            "load_seconds": load_s, "max_abs_diff_vs_torch": check_vs_self,
            **({"details": extra} if extra else {})}


# ---------------------------------------------------------------------------------------------- ONNX


def onnx_dir_for(spec: str, progress: Any = None) -> Path:
    """An ONNX export (KV cache) of ``spec``: the directory itself if it is one, else a cached export."""
    import hashlib

    from owlctl.engine.loading import cache_dir, content_hash
    from owlctl.ops.export import ExportConfig, export, is_onnx_export

    if is_onnx_export(spec):
        return Path(spec)
    src = _model_dir(spec)
    key = hashlib.sha256(f"{content_hash(src)}|kv".encode()).hexdigest()[:16]
    out = cache_dir() / "onnx" / key
    if not is_onnx_export(out):
        export(ExportConfig(checkpoint=spec, output=out, format="onnx", kv_cache=True, force=True), progress)
    return out


def _reference_logits(spec: str, prompt: Any, cfg: BenchConfig) -> tuple[Any, float | None, Any]:
    """Dense PyTorch logits of the last prompt position (row 0), the prunable sparsity, and the model info."""
    import torch

    from owlctl.engine.loading import load_model

    model, _tok, info = load_model(spec, cfg.dtype)
    with torch.inference_mode():
        logits = model(input_ids=prompt[:1]).logits[0, -1].float()
    sparsity = _prunable_sparsity(model)
    del model
    return logits, sparsity, info


def _row_onnxruntime(spec: str, cfg: BenchConfig, prompt: Any, task: Any, label: str) -> dict:
    import torch

    from owlctl.engine.onnx_export import ort_generate, ort_session
    from owlctl.ops.export import ONNX_FILE, read_onnx_export

    odir = onnx_dir_for(spec)
    doc = read_onnx_export(odir)
    if not doc["graph"]["kv_cache"]:
        raise InputError(f"{odir} holds a graph without KV cache; decode needs one",
                         hint="re-export with `owlctl export CHECKPOINT --format onnx --kv-cache -o DIR`")
    ref, sparsity, info = (None, None, None) if Path(spec) == odir else _reference_logits(spec, prompt, cfg)
    _settle_memory()
    rss0 = _rss_mb()
    t = time.perf_counter()
    sess = ort_session(odir / ONNX_FILE, cfg.threads)
    load_s = time.perf_counter() - t
    ids = prompt.numpy()

    def generate() -> dict:
        res = ort_generate(sess, doc["graph"], ids, cfg.new_tokens)
        res["first_logits"] = torch.from_numpy(res["first_logits"])
        return res

    runs = _timed_runs(generate, cfg, task, label)
    memory = {"rss_before_mb": rss0, "peak_rss_mb": _rss_mb("VmHWM"),
              "onnx_mb": (odir / ONNX_FILE).stat().st_size / 2**20}
    check = None if ref is None else float((runs[0]["first_logits"][0] - ref).abs().max())
    extra = {"onnx_dir": str(odir), "export_max_abs_diff": (doc.get("verification") or {}).get("max_abs_diff"),
             "intra_op_threads": cfg.threads}
    return _row(label, spec, info, sparsity, "onnxruntime", None, cfg, runs, memory, load_s, extra,
                check_vs_self=check)


# ---------------------------------------------------------------------------------------------- DeepSparse


def _row_deepsparse(spec: str, cfg: BenchConfig, prompt: Any, task: Any, label: str, py: Path) -> dict:
    import torch

    from owlctl.engine import deepsparse_host

    from owlctl.ops.export import ONNX_FILE, read_onnx_export

    odir = onnx_dir_for(spec)
    doc = read_onnx_export(odir)
    if not doc["graph"]["kv_cache"]:
        raise InputError(f"{odir} holds a graph without KV cache; decode needs one",
                         hint="re-export with `owlctl export CHECKPOINT --format onnx --kv-cache -o DIR`")
    ref, sparsity, info = (None, None, None) if Path(spec) == odir else _reference_logits(spec, prompt, cfg)
    req = {"onnx": str(odir / ONNX_FILE), "inputs": doc["graph"]["inputs"], "geometry": doc["graph"]["geometry"],
           "prompt": prompt.tolist(), "new_tokens": cfg.new_tokens, "runs": cfg.runs, "warmup": cfg.warmup,
           "threads": cfg.threads}
    t = time.perf_counter()
    res = deepsparse_host.run_worker(py, req, cfg.threads)
    wall = time.perf_counter() - t
    task.advance(cfg.warmup + cfg.runs, info=label)
    runs = [{"prefill_s": r["prefill_s"], "step_s": r["step_s"]} for r in res["runs"]]
    first = torch.tensor(res["last_logits"][0])
    check = None if ref is None else float((first - ref).abs().max())
    memory = {"rss_before_mb": res.get("rss_before_mb"), "peak_rss_mb": res.get("peak_rss_mb"),
              "onnx_mb": (odir / ONNX_FILE).stat().st_size / 2**20, "process": "worker"}
    extra = {"onnx_dir": str(odir), "deepsparse_version": res.get("deepsparse_version"), "num_cores": cfg.threads,
             "NM_BIND_THREADS_TO_CORES": "1", "compile_seconds": res.get("compile_seconds"),
             "worker_wall_seconds": wall, "python": str(py)}
    return _row(label, spec, info, sparsity, "deepsparse", None, cfg, runs, memory,
                sum(res.get("compile_seconds") or [0]), extra, check_vs_self=check)


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
    """Benchmark and return one ``owlctl.bench/1`` document."""
    import platform

    import torch

    from owlctl.engine.loading import resolve_device
    from owlctl.formats._io import header
    from owlctl.ops.common import now

    _validate(cfg)
    if cfg.device != "cpu":
        resolve_device(cfg.device)
    py = None
    setup_info = None
    if cfg.backend == "deepsparse":
        from owlctl.engine import deepsparse_host

        if cfg.setup:
            setup_info = deepsparse_host.setup_deepsparse()
        py = deepsparse_host.deepsparse_python(cfg.deepsparse_python)
    plan = _plan(cfg)
    meta = {}
    for _label, spec, _b, _k in plan:
        from owlctl.ops.export import is_onnx_export

        if is_onnx_export(spec) and cfg.backend in ("torch", "torch-sparse"):
            raise InputError(f"{spec} is an ONNX export; the torch backends need a model directory",
                             hint="pass the checkpoint, or use --backend onnxruntime / deepsparse")
        meta[spec] = _check_context(spec, cfg)
    vocab = min(m["vocab_size"] for m in meta.values())
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, vocab, (cfg.batch_size, cfg.prompt_len), generator=g)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    rows = []
    try:
        from contextlib import nullcontext

        ctx = progress.task("bench", total=len(plan) * (cfg.warmup + cfg.runs)) if progress else nullcontext(None)
        with ctx as task:
            task = task or _NullTask()
            for label, spec, backend, kernel in plan:
                if backend in ("torch", "torch-sparse"):
                    rows.append(_row_torch(spec, cfg, prompt, kernel, task, label))
                elif backend == "onnxruntime":
                    rows.append(_row_onnxruntime(spec, cfg, prompt, task, label))
                else:
                    rows.append(_row_deepsparse(spec, cfg, prompt, task, label, py))
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    comparison = None
    if len(rows) == 2:
        d, s = rows
        comparison = {
            "baseline": d["label"], "candidate": s["label"],
            "decode_speedup": _ratio(s["decode"]["tokens_per_s"], d["decode"]["tokens_per_s"]),
            "prefill_speedup": _ratio(s["prefill"]["tokens_per_s"], d["prefill"]["tokens_per_s"]),
            "p50_step_latency_ratio": _ratio(s["decode"]["step_ms"]["p50"], d["decode"]["step_ms"]["p50"]),
        }
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "onnxruntime", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {
        **header("bench"), "created": now(),
        "settings": {"backend": cfg.backend, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
                     "batch_size": cfg.batch_size, "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads,
                     "torch_num_threads": torch_threads, "device": cfg.device, "dtype": cfg.dtype,
                     "sparse_kernel": cfg.sparse_kernel if cfg.backend == "torch-sparse" else None,
                     "seed": cfg.seed, "prompt": "random token ids (seeded)", "decode": "greedy, KV cache",
                     "statistic": "median over runs; step percentiles pool all timed steps"},
        "host": {"cpu": _cpu_info(), "platform": platform.platform(), "versions": versions,
                 "cuda": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None},
        "models": meta,
        "rows": rows,
        "comparison": comparison,
        **({"deepsparse_setup": setup_info} if setup_info else {}),
    }


def _cpu_info() -> dict:
    from owlctl.engine.deepsparse_host import cpu_info

    return cpu_info()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class _NullTask:
    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass
