"""PyTorch as a runtime: greedy prefill + decode through the KV cache, with dense kernels or owlctl's sparse
CPU kernels (torch-sparse), and on CUDA 2:4 semi-structured kernels."""

from __future__ import annotations

import time
from typing import Any

from owlctl.deploy.measure import row, sync, timed_runs
from owlctl.engine.memory import rss_mb, settle_memory
from owlctl.errors import ModelError


def prunable_sparsity(model: Any) -> float | None:
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


def weights_mb(model: Any) -> float:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n / 2**20


def layout_of(model: Any) -> Any:
    """The family layout of ``model`` (resolve it before the Linears are swapped), or None."""
    from owlctl.families import resolve

    try:
        return resolve(model)
    except ModelError:
        return None


def step_bytes(model: Any, layout: Any = None) -> dict | None:
    """Bytes of weights one decode step reads: the prunable Linears (stored bytes once they are sparse) and
    the whole model (every parameter and buffer, less an input embedding that is not also the output head:
    a step reads only one of its rows). ``layout``: resolved before a sparse swap (default: now)."""
    layout = layout or layout_of(model)
    if layout is None:
        return None
    linear = 0
    for i in range(layout.num_blocks):
        for m in layout.linears(i).values():
            linear += m.stored_bytes() if hasattr(m, "stored_bytes") else m.weight.numel() * m.weight.element_size()
    total = int(weights_mb(model) * 2**20)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (head is None or head.weight.data_ptr() != emb.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return {"linear_bytes": linear, "model_bytes": total}


def torch_generate(model: Any, ids: Any, steps: int, device: str) -> dict:
    """Prefill ``ids`` then ``steps`` greedy decode steps. Returns times and the first logits (CPU)."""
    import torch

    from owlctl.deploy.onnx import _cache_kwarg, make_cache

    cache_kw = _cache_kwarg(model)
    cache = make_cache(model.config, [])
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        sync(device)
        t_prefill = time.perf_counter() - t
        first = out.logits[:, -1, :].float().cpu()
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            sync(device)
            step_s.append(time.perf_counter() - t)
    return {"prefill_s": t_prefill, "step_s": step_s, "first_logits": first}


def row_torch(spec: str, cfg: Any, prompt: Any, kernel: str | None, task: Any, label: str) -> dict:
    import torch

    from owlctl.engine.models import load_model

    settle_memory()
    rss0 = rss_mb()
    t = time.perf_counter()
    model, _tok, info = load_model(spec, cfg.dtype)
    sparsity = prunable_sparsity(model)
    layout = layout_of(model)
    device = cfg.device
    extra: dict[str, Any] = {}
    reference = None
    if kernel is not None:
        if device.startswith("cuda"):
            from owlctl.deploy.kernels.semi_structured import semi_structured

            model.to(device)
            extra["sparse"] = semi_structured(model)
            kernel = extra["sparse"]["kernel"]
        else:
            with torch.inference_mode():  # dense logits of the same weights, before the swap
                reference = model(input_ids=prompt[:1, :16]).logits[0, -1].float()
            from owlctl.deploy.kernels.linear import sparsify

            extra["sparse"] = sparsify(model, kernel, threads=cfg.threads)
            kernel = extra["sparse"]["kernel"]
    else:
        model.to(device)
    load_s = time.perf_counter() - t
    ids = prompt.to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = timed_runs(lambda: torch_generate(model, ids, cfg.new_tokens, device), cfg, task, label)
    check = None
    if reference is not None:
        with torch.inference_mode():
            got = model(input_ids=prompt[:1, :16]).logits[0, -1].float()
        check = float((got - reference).abs().max())  # the model is freed when this row returns
    memory = {"rss_before_mb": rss0, "peak_rss_mb": rss_mb("VmHWM"), "weights_mb": weights_mb(model)}
    traffic = step_bytes(model, layout)
    if device.startswith("cuda"):
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if kernel is None:
        check = 0.0  # this row is the PyTorch dense reference itself
    return row(label, spec, info, sparsity, "torch-sparse" if kernel else "torch", kernel, cfg, runs, memory,
                load_s, extra, check_vs_self=check, traffic=traffic)
