"""Evaluating an opened model: perplexity on each source's windows, the sparsity audit, and zero-shot tasks.
A model in memory is moved to the device for it and back; a streamed one passes block by block
(engine/evaluation/streamed.py), and zero-shot tasks (lm-eval drives the whole model) materialise it whole."""

from __future__ import annotations

import time
from typing import Any, Sequence

from owlctl.engine.evaluation.audit import audit_sparsity
from owlctl.engine.evaluation.texts import SPLITS, _windows_cap, _windows_sha256, token_streams
from owlctl.engine.evaluation.zeroshot import PAPER_TASKS
from owlctl.errors import InputError
from owlctl.progress import interactive


def _expand_tasks(tasks: Sequence[str] | None) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    out: list[str] = []
    for t in tasks:
        for name in (PAPER_TASKS if t == "paper" else (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def _check_seqlen(model: Any, seqlen: int) -> None:
    from owlctl.engine.evaluation.perplexity import max_positions

    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"--seqlen {seqlen} is longer than the model's {limit} positions "
                         "(max_position_embeddings)", hint=f"use --seqlen {limit} or less")


def evaluate_loaded(model: Any, tok: Any, **kw: Any) -> dict:
    """evaluate_host for a model the caller holds in memory."""
    from owlctl.engine.models.hosts import InMemory

    return evaluate_host(InMemory(model), tok, **kw)


def evaluate_host(host: Any, tok: Any, *, data: Sequence[str] = ("builtin:wiki",), split: str = "test",
                    seqlen: int = 2048, batch_size: int = 1, max_windows: int | None = None, ppl: bool = True,
                    tasks: Sequence[str] | None = None, limit: int | None = None, task_dir: str | None = None,
                    device: str = "cpu", records: dict | None = None, streams: dict | None = None,
                    progress: Any = None, bos: str = "auto", activations: str = "device") -> dict:
    """Evaluate the model of ``host`` (engine/models/hosts.py): {"perplexity": {source: {...}}, "audit": {...}, "zeroshot": {...} |
    None, "seconds": {...}}. ``records`` = {"allocation": doc, "report": doc} for the audit (None: "no
    allocation recorded"); ``streams`` = {source: token ids} to reuse (e.g. for an identical comparison), made
    by token_streams with the same ``bos`` (auto | always | never: a BOS per window, see engine/data).
    The model is moved to ``device`` for the evaluation and back to where it was afterwards. ``progress``
    None also mutes lm-eval's own progress output."""
    from owlctl.engine.data import resolve_bos
    from owlctl.engine.models import resolve_device

    device = resolve_device(device)
    data = (data,) if isinstance(data, str) else tuple(data)
    bos = resolve_bos(tok, bos) if ppl else bos
    bos_id = int(tok.bos_token_id) if ppl and bos == "always" else None
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    tasks = _expand_tasks(tasks)
    seconds: dict[str, float] = {}
    streams = _prepare(host.model, tok, data, split, seqlen, max_windows, ppl, tasks, task_dir, streams, bos, bos_id,
                       seconds)
    if host.streamed:
        return _evaluate_streamed(host, tok, streams or {}, records, split, seqlen, batch_size, max_windows, tasks,
                                  limit, task_dir, device, progress, bos_id, activations, seconds)
    model = host.model
    t0 = time.perf_counter()
    audit = audit_sparsity(model, records)
    seconds["audit"] = round(time.perf_counter() - t0, 3)
    home = next(model.parameters()).device
    moved = not _same_device(home, device)
    if moved:
        model.to(device)
    try:
        results = _perplexities(model, streams or {}, split, seqlen, batch_size, max_windows, device, progress,
                                bos_id, seconds)
        zs = None
        if tasks:
            from owlctl.engine.evaluation.zeroshot import zeroshot

            t0 = time.perf_counter()
            zs = zeroshot(model, tok, tasks, limit=limit, task_dir=task_dir, batch_size=batch_size,
                          show_progress=interactive(progress))  # lm-eval's own bars only on a terminal
            seconds["zeroshot"] = round(time.perf_counter() - t0, 3)
    finally:
        if moved:
            model.to(home)
    return {"perplexity": results, "audit": audit, "zeroshot": zs, "seconds": seconds}


def _evaluate_streamed(host: Any, tok: Any, streams: dict, records: dict | None, split: str, seqlen: int,
                       batch_size: int, max_windows: int | None, tasks: tuple | None, limit: int | None,
                       task_dir: Any, device: str, progress: Any, bos_id: int | None, activations: str,
                       seconds: dict) -> dict:
    from owlctl.engine.evaluation.audit import Auditor
    from owlctl.engine.evaluation.streamed import audit_streamed, perplexity_streamed

    auditor = Auditor(records or {}, host.layout.num_blocks)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for k, (source, ids) in enumerate(streams.items()):
        cap = _windows_cap(source, max_windows)
        res = perplexity_streamed(host, ids, seqlen, batch_size=batch_size, max_windows=cap, device=device,
                                  progress=progress, description=f"ppl {source}", bos_id=bos_id,
                                  auditor=auditor if k == 0 else None, activations=activations)
        results[source] = {"source": source, "split": split, **res, "stream_tokens": int(ids.numel()),
                           "windows_sha256": _windows_sha256(ids, seqlen, cap, bos_id)}
    if streams:
        seconds["perplexity"] = round(time.perf_counter() - t0, 3)
    else:
        t0 = time.perf_counter()
        audit_streamed(host, auditor, device)
        seconds["audit"] = round(time.perf_counter() - t0, 3)
    zs = None
    if tasks:
        from owlctl.engine.evaluation.zeroshot import zeroshot
        from owlctl.progress import note

        note("zero-shot tasks run the whole model: reading all of its weights into memory")
        t0 = time.perf_counter()
        mods = list(host.model.modules())
        host.materialise(mods, device)
        try:
            zs = zeroshot(host.model, tok, tasks, limit=limit, task_dir=task_dir, batch_size=batch_size,
                          show_progress=interactive(progress))
        finally:
            host.release(mods)
        seconds["zeroshot"] = round(time.perf_counter() - t0, 3)
    return {"perplexity": results, "audit": auditor.summary(), "zeroshot": zs, "seconds": seconds}


def _prepare(model: Any, tok: Any, data: tuple, split: str, seqlen: int, max_windows: int | None, ppl: bool,
             tasks: tuple | None, task_dir: Any, streams: dict | None, bos: str, bos_id: int | None,
             seconds: dict) -> dict | None:
    """Everything that can fail before a forward pass: the window length, unknown tasks, a too-short corpus."""
    from owlctl.engine.evaluation.perplexity import windows

    if ppl:
        _check_seqlen(model, seqlen)
    if tasks:
        from owlctl.engine.evaluation.zeroshot import task_manager

        task_manager(tasks, task_dir)  # unknown tasks fail here, before any forward pass (the index is cached)
    if not ppl:
        return None
    if streams is None:
        t0 = time.perf_counter()
        streams = token_streams(data, split, tok, bos)
        seconds["tokenize"] = round(time.perf_counter() - t0, 3)
    for source, ids in streams.items():
        windows(ids, seqlen, _windows_cap(source, max_windows), bos_id)  # too-short corpus: fail before work
    return streams


def _perplexities(model: Any, streams: dict, split: str, seqlen: int, batch_size: int, max_windows: int | None,
                  device: str, progress: Any, bos_id: int | None, seconds: dict) -> dict:
    from owlctl.engine.evaluation.perplexity import perplexity

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for source, ids in streams.items():
        cap = _windows_cap(source, max_windows)
        res = perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=cap, device=device,
                         progress=progress, description=f"ppl {source}", bos_id=bos_id)
        results[source] = {"source": source, "split": split, **res, "stream_tokens": int(ids.numel()),
                           "windows_sha256": _windows_sha256(ids, seqlen, cap, bos_id)}
    if streams:
        seconds["perplexity"] = round(time.perf_counter() - t0, 3)
    return results


def _same_device(a: Any, b: Any) -> bool:
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device()
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return True
