"""Timing runs and summarising them: medians over runs, pooled step-latency percentiles, one row per
(model, backend) with its memory and its logits check against PyTorch."""

from __future__ import annotations

import statistics
from typing import Any, Callable


def percentiles(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarise(runs: list[dict], batch: int, prompt_len: int) -> tuple[dict, dict]:
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
              "tokens_per_s_runs": dec_tps, "step_ms": percentiles(steps)}
    return prefill, decode


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_runs(fn: Callable[[], dict], cfg: Any, task: Any, label: str) -> list[dict]:
    for _ in range(cfg.warmup):
        fn()
        task.advance(1, info=f"{label} warm-up")
    runs = []
    for _ in range(cfg.runs):
        runs.append(fn())
        task.advance(1, info=label)
    return runs


def row(label: str, spec: str, info: Any, sparsity: float | None, backend: str, kernel: str | None,
         cfg: Any, runs: list[dict], memory: dict, load_s: float, extra: dict,
         check_vs_self: float | None = None, traffic: dict | None = None) -> dict:
    prefill, decode = summarise(runs, cfg.batch_size, cfg.prompt_len)
    if memory.get("peak_rss_mb") is not None and memory.get("rss_before_mb") is not None:
        memory["rss_delta_mb"] = memory["peak_rss_mb"] - memory["rss_before_mb"]
    return {"label": label, "model": {"spec": spec, "id": info.id if info else spec,
                                      "prunable_sparsity": sparsity},
            "backend": backend, "kernel": kernel, "prefill": prefill, "decode": decode, "memory": memory,
            "load_seconds": load_s, "max_abs_diff_vs_torch": check_vs_self,
            "bandwidth": bandwidth(traffic, decode, cfg.batch_size),
            **({"details": extra} if extra else {})}


def bandwidth(traffic: dict | None, decode: dict, batch: int) -> dict | None:
    """Effective GB/s of one decode step: weight bytes it reads / the median step's seconds. The step also
    spends time outside the weights (attention, norms, Python), so this is a lower bound on the rate at which
    the kernels themselves stream."""
    tps = decode.get("tokens_per_s")
    if not traffic or not tps:
        return None
    step_s = batch / tps
    return {"linear_bytes_per_step": traffic["linear_bytes"], "model_bytes_per_step": traffic["model_bytes"],
            "step_seconds": step_s, "linear_gb_per_s": traffic["linear_bytes"] / step_s / 1e9,
            "model_gb_per_s": traffic["model_bytes"] / step_s / 1e9,
            "linear_fraction_of_probe": None, "model_fraction_of_probe": None}


def with_probe(rows: list[dict], probe: dict | None) -> None:
    """Each row's GB/s as a fraction of the probe's read bandwidth (in place)."""
    rate = (probe or {}).get("gb_per_s")
    for r in rows:
        b = r.get("bandwidth")
        if b and rate:
            b["linear_fraction_of_probe"] = b["linear_gb_per_s"] / rate
            b["model_fraction_of_probe"] = b["model_gb_per_s"] / rate


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
