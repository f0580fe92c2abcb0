"""The prune pass: every block pruned in turn, each seeing the outputs of the already pruned blocks (SPEC 1.4,
5), by the method the allocation names; returns per-block report rows with exact counts."""

from __future__ import annotations

import time
from typing import Any
from owlctl.errors import InputError, ModelError


def _targets(alloc: dict) -> list[tuple[float | None, tuple[int, int] | None]]:
    pat = alloc["pattern"]
    if pat["kind"] == "nm":
        return [(None, (int(b["n_keep"]), int(pat["m"]))) for b in alloc["blocks"]]
    return [(float(b["sparsity"]), None) for b in alloc["blocks"]]


def prune_model(model: Any, layout: Any, alloc: dict, method: str, opts: Any, calib: Any, *, device: str,
                batch_size: int, progress: Any = None) -> tuple[list[dict], Any]:
    """Prune a loaded model in place following ``alloc``; returns (per-block report rows, timings)."""
    import torch

    from owlctl.core.methods import expected_pruned, get, prune_weight
    from owlctl.engine.calibration.driver import Timings, run_blocks
    from owlctl.progress import task as progress_task

    needs = get(method).needs
    targets = _targets(alloc)
    if len(targets) != layout.num_blocks:
        raise ModelError(f"allocation has {len(targets)} blocks but the model has {layout.num_blocks}")
    for i, (_s, nm) in enumerate(targets):
        if nm is not None:
            for name, lin in layout.linears(i).items():
                if lin.in_features % nm[1]:
                    raise InputError(f"N:M with M={nm[1]} needs M to divide every input width, but "
                                     f"{layout.block_name(i)}.{name} has {lin.in_features} inputs",
                                     hint="choose M among the divisors of the widths, e.g. 4 or 8")
    rows: list[dict] = []

    def decide(i: int, _block: Any, linears: dict, stats: dict) -> None:
        sparsity, nm = targets[i]
        mats = []
        for name, lin in linears.items():
            w = lin.weight
            before = w == 0  # zeros the weights already had (e.g. dequantised GGUF weights)
            kw: dict = {}
            if "act_norm" in needs:
                kw["act_sq_norm"] = stats[name].act_sq_norm()
            if "hessian" in needs:
                kw["hessian"] = stats[name].hessian()
            if nm is not None:
                new_w, mask = prune_weight(method, w.detach(), n_keep=nm[0], m=nm[1], options=opts, **kw)
            else:
                new_w, mask = prune_weight(method, w.detach(), sparsity=sparsity, options=opts, **kw)
            w.data.copy_(new_w)
            mask = mask.bool()
            mats.append((name, tuple(w.shape), torch.stack([mask.sum(), (w == 0).sum(), before.sum(),
                                                            (mask & ~before).sum()])))
        counts = torch.stack([m[2] for m in mats]).tolist()  # one device sync per block
        linear_rows = []
        for (name, shape, _c), (masked, zeros, pre, newly) in zip(mats, counts):
            numel = shape[0] * shape[1]
            linear_rows.append({"name": name, "shape": list(shape), "numel": numel, "pruned": int(masked),
                                "zeros": int(zeros), "realised_sparsity": zeros / numel, "preexisting_zeros": int(pre),
                                "newly_zeroed": int(newly),
                                "expected_pruned": expected_pruned(method, shape, sparsity, nm, opts)})
        numel = sum(r["numel"] for r in linear_rows)
        zeros = sum(r["zeros"] for r in linear_rows)
        rows.append({"index": i, "name": layout.block_name(i), "numel": numel, "zeros": zeros,
                     "realised_sparsity": zeros / numel,
                     "pruned": sum(r["pruned"] for r in linear_rows),
                     "preexisting_zeros": sum(r["preexisting_zeros"] for r in linear_rows),
                     "newly_zeroed": sum(r["newly_zeroed"] for r in linear_rows),
                     "target_sparsity": sparsity if nm is None else 1 - nm[0] / nm[1],
                     "n_keep": None if nm is None else nm[0], "linears": linear_rows})

    if not needs:  # data-free (magnitude): no calibration forwards
        timings = Timings()
        t0 = time.perf_counter()
        with progress_task(progress, f"prune ({method})", layout.num_blocks) as task, torch.inference_mode():
            for i in range(layout.num_blocks):
                block = layout.blocks[i]
                if device != "cpu":
                    block.to(device)
                decide(i, block, layout.linears(i), {})
                if device != "cpu":
                    block.to("cpu")
                task.advance(1, info=f"block {i + 1}/{layout.num_blocks}")
        timings.decide = time.perf_counter() - t0
        return rows, timings
    timings = run_blocks(model, layout, calib.input_ids, device=device, batch_size=batch_size,
                         needs=needs, decide=decide, propagate="pruned", progress=progress,
                         description=f"prune ({method})")
    return rows, timings
