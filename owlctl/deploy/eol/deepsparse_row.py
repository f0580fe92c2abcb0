"""A bench row on DeepSparse (end of life, June 2025): its own venv runs the worker on the ONNX export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from owlctl.deploy.measure import row
from owlctl.deploy.runtimes.onnxruntime import onnx_dir_for, reference_logits
from owlctl.errors import InputError


def row_deepsparse(spec: str, cfg: Any, prompt: Any, task: Any, label: str, py: Path) -> dict:
    import torch

    from owlctl.deploy.eol import deepsparse_host
    from owlctl.deploy.onnx import ONNX_FILE, read_onnx_export

    odir = onnx_dir_for(spec)
    doc = read_onnx_export(odir)
    if not doc["onnx"]["graph"]["kv_cache"]:
        raise InputError(f"{odir} holds a graph without KV cache; decode needs one",
                         hint="re-export with `owlctl export CHECKPOINT --format onnx --kv-cache -o DIR`")
    ref, sparsity, info, traffic = (None,) * 4 if Path(spec) == odir else reference_logits(spec, prompt, cfg)
    req = {"onnx": str(odir / ONNX_FILE), "inputs": doc["onnx"]["graph"]["inputs"], "geometry": doc["onnx"]["graph"]["geometry"],
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
    return row(label, spec, info, sparsity, "deepsparse", None, cfg, runs, memory,
                sum(res.get("compile_seconds") or [0]), extra, check_vs_self=check, traffic=traffic)
