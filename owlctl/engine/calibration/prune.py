"""The prune pass: every block pruned in turn, each seeing the outputs of the already pruned blocks (SPEC 1.4,
5), by the method the allocation names; returns per-block report rows with exact counts."""

from __future__ import annotations

from typing import Any

from owlctl.errors import InputError, ModelError


def _targets(alloc: dict) -> list[tuple[float | None, tuple[int, int] | None]]:
    pat = alloc["pattern"]
    if pat["kind"] == "nm":
        return [(None, (int(b["n_keep"]), int(pat["m"]))) for b in alloc["blocks"]]
    return [(float(b["sparsity"]), None) for b in alloc["blocks"]]


def prune_model(host: Any, alloc: dict, method: str, opts: Any, calib: Any, *, device: str, batch_size: int,
                progress: Any = None, after: Any = None, activations: str = "device") -> tuple[list[dict], Any]:
    """Prune the model of ``host`` (engine/models/hosts.py) following ``alloc``: in place for a model in
    memory; for a streamed one ``after(i, block)`` must save each block before it is dropped. Returns (per-block
    report rows, timings). Data-free methods (magnitude) run no calibration forward (``calib`` may be None)."""
    from owlctl.core.methods import get
    from owlctl.engine.calibration.driver import run_blocks

    layout = host.layout
    needs = get(method).needs
    targets = _targets(alloc)
    _check_targets(layout, targets)
    rows: list[dict] = []

    def decide(i: int, _block: Any, linears: dict, stats: dict) -> None:
        rows.append(prune_block(layout.block_name(i), i, linears, stats, method, targets[i], opts))

    timings = run_blocks(host, calib.input_ids if needs else None, device=device, batch_size=batch_size,
                         needs=needs, decide=decide, propagate="pruned", progress=progress,
                         description=f"prune ({method})", after=after, activations=activations)
    return rows, timings


def _check_targets(layout: Any, targets: list) -> None:
    if len(targets) != layout.num_blocks:
        raise ModelError(f"allocation has {len(targets)} blocks but the model has {layout.num_blocks}")
    for i, (_s, nm) in enumerate(targets):
        if nm is not None:
            for name, lin in layout.linears(i).items():
                if lin.in_features % nm[1]:
                    raise InputError(f"N:M with M={nm[1]} needs M to divide every input width, but "
                                     f"{layout.block_name(i)}.{name} has {lin.in_features} inputs",
                                     hint="choose M among the divisors of the widths, e.g. 4 or 8")


def prune_block(name: str, i: int, linears: dict, stats: dict, method: str,
                target: tuple[float | None, tuple[int, int] | None], opts: Any, keep_statistics: bool = False) -> dict:
    """Prune every Linear of block ``i`` in place; its report row with exact counts (one device sync).
    The last Linear to use a statistic takes its Hessian (no copy), unless ``keep_statistics`` (the same
    statistics prune the block again, e.g. at several levels)."""
    import torch

    from owlctl.core.methods import expected_pruned, get, prune_weight
    from owlctl.engine.distributed import current

    needs = get(method).needs
    sparsity, nm = target
    # Several processes: SparseGPT's solves (the expensive part) are spread, matrix k on rank k % N, and the
    # results broadcast; the other methods are cheap and identical everywhere, so every rank computes them.
    world = current() if "hessian" in needs else None
    last = {id(stats[lname]): lname for lname in linears} if stats and not keep_statistics else {}
    mats, pending = [], []

    def count(lname: str, w: Any, mask: Any, before: Any) -> None:
        mats.append((lname, tuple(w.shape), torch.stack([mask.sum(), (w == 0).sum(), before.sum(),
                                                         (mask & ~before).sum()])))

    for k, (lname, lin) in enumerate(linears.items()):
        w = lin.weight
        before = w == 0  # zeros the weights already had (e.g. dequantised GGUF weights)
        if world is not None and k % world.size != world.rank:
            pending.append((lname, w, None, before))
            continue
        kw: dict = {}
        if "act_norm" in needs:
            kw["act_sq_norm"] = stats[lname].act_sq_norm()
        if "hessian" in needs:
            kw["hessian"] = stats[lname].hessian(consume=last.get(id(stats[lname])) == lname)
            kw["overwrite_hessian"] = True  # a tensor of its own: the solver factors it in place
        pat = {"n_keep": nm[0], "m": nm[1]} if nm is not None else {"sparsity": sparsity}
        new_w, mask = prune_weight(method, w.detach(), options=opts, **pat, **kw)
        w.data.copy_(new_w)
        if world is None:
            count(lname, w, mask.bool(), before)
        else:
            pending.append((lname, w, mask.bool(), before))
    if world is not None:
        from owlctl.engine.distributed.stats import share_solutions

        masks = share_solutions(world, [(w, mask) for _n, w, mask, _b in pending])
        for (lname, w, _m, before), mask in zip(pending, masks):
            count(lname, w, mask, before)
    counts = torch.stack([m[2] for m in mats]).tolist()
    lin_rows = []
    for (lname, shape, _c), (masked, zeros, pre, newly) in zip(mats, counts):
        numel = shape[0] * shape[1]
        lin_rows.append({"name": lname, "shape": list(shape), "numel": numel, "pruned": int(masked),
                         "zeros": int(zeros), "realised_sparsity": zeros / numel, "preexisting_zeros": int(pre),
                         "newly_zeroed": int(newly), "expected_pruned": expected_pruned(method, shape, sparsity, nm,
                                                                                        opts)})
    numel = sum(r["numel"] for r in lin_rows)
    total = {k: sum(r[k] for r in lin_rows) for k in ("zeros", "pruned", "preexisting_zeros", "newly_zeroed")}
    return {"index": i, "name": name, "numel": numel, "zeros": total["zeros"],
            "realised_sparsity": total["zeros"] / numel, "pruned": total["pruned"],
            "preexisting_zeros": total["preexisting_zeros"], "newly_zeroed": total["newly_zeroed"],
            "target_sparsity": sparsity if nm is None else 1 - nm[0] / nm[1],
            "n_keep": None if nm is None else nm[0], "linears": lin_rows}
