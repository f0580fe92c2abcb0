"""onnxruntime as a runtime: the model's ONNX export (made once and cached, with KV cache) run for prefill
and greedy decode, checked against PyTorch's logits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from owlctl.deploy.measure import row, timed_runs
from owlctl.deploy.runtimes.torch import prunable_sparsity, step_bytes
from owlctl.engine.memory import rss_mb, settle_memory
from owlctl.engine.models import local_dir
from owlctl.errors import InputError


def onnx_dir_for(spec: str, progress: Any = None) -> Path:
    """An ONNX export (KV cache) of ``spec``: the directory itself if it is one, else a cached export."""
    import hashlib

    from owlctl.deploy.onnx import is_onnx_export, write_export
    from owlctl.engine.models import cache_dir, content_hash, load_model
    from owlctl.formats.checkpoint import checkpoint_writer
    from owlctl.progress import note

    if is_onnx_export(spec):
        return Path(spec)
    src = local_dir(spec)[0]
    key = hashlib.sha256(f"{content_hash(src)}|kv".encode()).hexdigest()[:16]
    out = cache_dir() / "onnx" / key
    if not is_onnx_export(out):
        note(f"exporting {spec} to ONNX once (cached in {out})")
        model, tok, info = load_model(spec)
        with checkpoint_writer(out, True) as tmp:
            write_export(model, tok, info, tmp)
    return out


def reference_logits(spec: str, prompt: Any, cfg: Any) -> tuple[Any, float | None, Any, dict | None]:
    """Dense PyTorch logits of the last prompt position (row 0), the prunable sparsity, the model info and
    the weight bytes a decode step reads (dense: an ONNX graph stores every weight dense)."""
    import torch

    from owlctl.engine.models import load_model

    model, _tok, info = load_model(spec, cfg.dtype)
    with torch.inference_mode():
        logits = model(input_ids=prompt[:1]).logits[0, -1].float()
    sparsity = prunable_sparsity(model)
    traffic = step_bytes(model)
    del model
    return logits, sparsity, info, traffic


def row_onnxruntime(spec: str, cfg: Any, prompt: Any, task: Any, label: str) -> dict:
    import torch

    from owlctl.deploy.onnx import ONNX_FILE, ort_generate, ort_session, read_onnx_export

    odir = onnx_dir_for(spec)
    doc = read_onnx_export(odir)
    if not doc["onnx"]["graph"]["kv_cache"]:
        raise InputError(f"{odir} holds a graph without KV cache; decode needs one",
                         hint="re-export with `owlctl export CHECKPOINT --format onnx --kv-cache -o DIR`")
    ref, sparsity, info, traffic = (None,) * 4 if Path(spec) == odir else reference_logits(spec, prompt, cfg)
    settle_memory()
    rss0 = rss_mb()
    t = time.perf_counter()
    sess = ort_session(odir / ONNX_FILE, cfg.threads)
    load_s = time.perf_counter() - t
    ids = prompt.numpy()

    def generate() -> dict:
        res = ort_generate(sess, doc["onnx"]["graph"], ids, cfg.new_tokens)
        res["first_logits"] = torch.from_numpy(res["first_logits"])
        return res

    runs = timed_runs(generate, cfg, task, label)
    memory = {"rss_before_mb": rss0, "peak_rss_mb": rss_mb("VmHWM"),
              "onnx_mb": (odir / ONNX_FILE).stat().st_size / 2**20}
    check = None if ref is None else float((runs[0]["first_logits"][0] - ref).abs().max())
    extra = {"onnx_dir": str(odir), "export_max_abs_diff": (doc["onnx"].get("verification") or {}).get("max_abs_diff"),
             "intra_op_threads": cfg.threads}
    return row(label, spec, info, sparsity, "onnxruntime", None, cfg, runs, memory, load_s, extra,
                check_vs_self=check, traffic=traffic)
