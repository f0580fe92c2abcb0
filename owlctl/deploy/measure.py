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
         check_vs_self: float | None = None) -> dict:
    prefill, decode = summarise(runs, cfg.batch_size, cfg.prompt_len)
    if memory.get("peak_rss_mb") is not None and memory.get("rss_before_mb") is not None:
        memory["rss_delta_mb"] = memory["peak_rss_mb"] - memory["rss_before_mb"]
    return {"label": label, "model": {"spec": spec, "id": info.id if info else spec,
                                      "prunable_sparsity": sparsity},
            "backend": backend, "kernel": kernel, "prefill": prefill, "decode": decode, "memory": memory,
            "load_seconds": load_s, "max_abs_diff_vs_torch": check_vs_self,
            **({"details": extra} if extra else {})}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
