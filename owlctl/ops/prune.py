"""`owlctl prune` and `owlctl nm`: score (magnitude | wanda | sparsegpt) x allocation (uniform | owl) x
pattern (unstructured | N:M | mixed N:M), one layer-by-layer driver for every combination (SPEC 1.4, 5)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlctl.errors import InputError, ModelError


@dataclass(frozen=True)
class PruneConfig:
    model: str
    output: Path | None
    method: str = "wanda"
    # allocation: exactly one of allocation file, profile (OWL), or uniform
    allocation: Path | None = None
    from_profile: Path | None = None
    uniform: bool = False
    target_sparsity: float | None = None
    outlier_m: float | None = None
    lam: float | None = None
    pattern: str | None = None  # "N:M", N kept
    balance: str = "blocks"
    clamp: str = "redistribute"
    max_sparsity: float = 0.99
    special: bool = False
    # calibration and compute
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    bos: str = "auto"  # auto | always | never (engine/data.py); never = the reference protocol
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    # method options
    wanda_group: str = "row"
    wanda_variant: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    force: bool = False
    extra: dict = field(default_factory=dict)


def expected_pruned(method: str, shape: tuple[int, int], sparsity: float | None, nm: tuple[int, int] | None,
                    opts: Any) -> int:
    """How many weights a matrix of ``shape`` must lose under the method's comparison group."""
    from owlctl.core.masks import prune_count

    rows, cols = shape
    if nm is not None:
        n_keep, m = nm
        return rows * (cols // m) * (m - n_keep)
    if sparsity is None or sparsity == 0:
        return 0
    if method == "wanda" and not opts.wanda_variant:
        return rows * prune_count(cols, sparsity) if opts.wanda_group == "row" else prune_count(rows * cols, sparsity)
    if method == "sparsegpt":
        b = opts.blocksize
        return sum(prune_count(rows * min(b, cols - i), sparsity) for i in range(0, cols, b))
    if method == "magnitude":
        return prune_count(rows * cols, sparsity)
    return -1  # wanda variant: data-dependent


def _validate(cfg: PruneConfig) -> None:
    from owlctl.core.methods import METHODS

    if cfg.method not in METHODS:
        raise InputError(f"unknown method {cfg.method!r}", hint="use one of: " + ", ".join(METHODS))
    chosen = [x for x in (cfg.allocation is not None, cfg.from_profile is not None, cfg.uniform) if x]
    if len(chosen) != 1:
        raise InputError("choose exactly one allocation: --allocation FILE, --from-profile PROFILE, or --uniform",
                         hint="e.g. `owlctl prune MODEL --method wanda --uniform -s 0.5 -o out`")
    if cfg.target_sparsity is not None and not (0.0 <= cfg.target_sparsity < 1.0):
        raise InputError(f"--target-sparsity must be a fraction in [0, 1), got {cfg.target_sparsity}",
                         hint="70% sparsity is -s 0.7")
    if cfg.pattern is None and cfg.allocation is None and cfg.target_sparsity is None:
        raise InputError("--target-sparsity is required for unstructured pruning", hint="e.g. -s 0.7")
    if cfg.lam is not None and cfg.lam < 0:
        raise InputError(f"--lambda must be >= 0, got {cfg.lam}")
    if cfg.wanda_group not in ("row", "matrix"):
        raise InputError("--wanda-group must be row or matrix")
    if cfg.wanda_variant and cfg.pattern is not None:
        raise InputError("--wanda-variant is for unstructured sparsity only")
    if cfg.batch_size < 1 or cfg.blocksize < 1 or cfg.percdamp < 0:
        raise InputError("--batch-size and --blocksize must be >= 1, --percdamp >= 0")


def _allocation(cfg: PruneConfig, info: Any, layout: Any) -> dict:
    from owlctl.ops.allocate import allocation_from_profile, uniform_allocation

    numels = [sum(lin.weight.numel() for lin in layout.linears(i).values()) for i in range(layout.num_blocks)]
    names = [layout.block_name(i) for i in range(layout.num_blocks)]
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    if cfg.uniform:
        return uniform_allocation(model_dict, names, numels, target_sparsity=cfg.target_sparsity, pattern=cfg.pattern)
    if cfg.from_profile is not None:
        from owlctl.formats.profile import read_profile

        prof, sha = read_profile(cfg.from_profile)
        _check_same_model(prof["model"], model_dict, f"profile {cfg.from_profile}",
                          f"owlctl profile {cfg.model} -o profile.json")
        return allocation_from_profile(prof, sha, str(cfg.from_profile), target_sparsity=cfg.target_sparsity,
                                       outlier_m=cfg.outlier_m, lam=cfg.lam, pattern=cfg.pattern,
                                       balance=cfg.balance, clamp=cfg.clamp, max_sparsity=cfg.max_sparsity,
                                       special=cfg.special)
    from owlctl.formats.allocation import read_allocation

    doc, _sha = read_allocation(cfg.allocation)
    _check_same_model(doc["model"], model_dict, f"allocation {cfg.allocation}",
                      f"owlctl allocate PROFILE_OF_{cfg.model} -o allocation.json")
    return doc


def _check_same_model(recorded: dict, actual: dict, what: str, fix: str) -> None:
    if recorded.get("num_blocks") != actual["num_blocks"]:
        raise InputError(f"{what} has {recorded.get('num_blocks')} blocks but the model has {actual['num_blocks']}",
                         hint=f"it was made for another model; re-run `{fix}`")
    if recorded.get("content_sha256") and recorded["content_sha256"] != actual["content_sha256"]:
        raise InputError(f"{what} was made for another model ({recorded.get('id')}, hash "
                         f"{recorded['content_sha256'][:12]}) than this one ({actual['id']}, hash "
                         f"{actual['content_sha256'][:12]})", hint=f"re-run `{fix}`")


def _targets(alloc: dict) -> list[tuple[float | None, tuple[int, int] | None]]:
    pat = alloc["pattern"]
    if pat["kind"] == "nm":
        return [(None, (int(b["n_keep"]), int(pat["m"]))) for b in alloc["blocks"]]
    return [(float(b["sparsity"]), None) for b in alloc["blocks"]]


def prune_model(model: Any, layout: Any, alloc: dict, method: str, opts: Any, calib: Any, *, device: str,
                batch_size: int, progress: Any = None) -> tuple[list[dict], Any]:
    """Prune a loaded model in place following ``alloc``; returns (per-block report rows, timings)."""
    import torch

    from owlctl.core.methods import NEEDS, prune_weight
    from owlctl.engine.driver import Timings, progress_task, run_blocks

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
            if "act_norm" in NEEDS[method]:
                kw["act_sq_norm"] = stats[name].act_sq_norm()
            if "hessian" in NEEDS[method]:
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
                                "zeros": int(zeros), "sparsity": zeros / numel, "preexisting_zeros": int(pre),
                                "newly_zeroed": int(newly),
                                "expected_pruned": expected_pruned(method, shape, sparsity, nm, opts)})
        numel = sum(r["numel"] for r in linear_rows)
        zeros = sum(r["zeros"] for r in linear_rows)
        rows.append({"index": i, "name": layout.block_name(i), "numel": numel, "zeros": zeros,
                     "sparsity": zeros / numel,
                     "pruned": sum(r["pruned"] for r in linear_rows),
                     "preexisting_zeros": sum(r["preexisting_zeros"] for r in linear_rows),
                     "newly_zeroed": sum(r["newly_zeroed"] for r in linear_rows),
                     "target_sparsity": sparsity if nm is None else 1 - nm[0] / nm[1],
                     "n_keep": None if nm is None else nm[0], "linears": linear_rows})

    if not NEEDS[method]:  # magnitude: no data, no forwards
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
                         needs=NEEDS[method], decide=decide, propagate="pruned", progress=progress,
                         description=f"prune ({method})")
    return rows, timings


def prune(cfg: PruneConfig, progress: Any = None) -> dict:
    """Prune and save a checkpoint (when ``output`` is set). Returns the summary document."""
    from owlctl.formats._io import check_output

    _validate(cfg)
    output = Path(cfg.output) if cfg.output is not None else None
    if output is not None:
        check_output(output, cfg.force)
    from owlctl.core.methods import NEEDS, MethodOptions
    from owlctl.engine.data import calibration
    from owlctl.engine.loading import load_model, resolve_device
    from owlctl.families import resolve
    from owlctl.formats.checkpoint import report_doc, save_checkpoint
    from owlctl.ops.common import calib_defaults, model_bytes, peak_rss_mb, resolve_bos, warn

    device = resolve_device(cfg.device)
    opts = MethodOptions(wanda_group=cfg.wanda_group, wanda_variant=cfg.wanda_variant, blocksize=cfg.blocksize,
                         percdamp=cfg.percdamp)
    t_start = time.perf_counter()
    model, tok, info = load_model(cfg.model, cfg.dtype)
    layout = resolve(model)
    alloc = _allocation(cfg, info, layout)  # validates the allocation against the model before any work
    t_load = time.perf_counter() - t_start
    calib = None
    t0 = time.perf_counter()
    if NEEDS[cfg.method]:
        source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples, cfg.seqlen)
        bos = resolve_bos(tok, cfg.bos)
        prof_bos = ((alloc.get("profile") or {}).get("calibration") or {}).get("bos")
        if prof_bos is not None and prof_bos != bos:
            warn(f"the profile was calibrated with --bos {prof_bos}, this pruning run calibrates with --bos {bos}")
        calib = calibration(source, tok, nsamples, seqlen, cfg.seed, bos=bos, bos_requested=cfg.bos)
    t_calib = time.perf_counter() - t0
    rows, timings = prune_model(model, layout, alloc, cfg.method, opts, calib, device=device,
                                batch_size=cfg.batch_size, progress=progress)
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    seconds = {"load": round(t_load, 3), "calibration_data": round(t_calib, 3), **timings.as_dict(),
               "total": round(time.perf_counter() - t_start, 3)}
    report = report_doc(model_dict, cfg.method, alloc["pattern"], rows, seconds)
    report["calibration"] = calib.as_dict() if calib is not None else None
    report["method_options"] = {"wanda_group": cfg.wanda_group, "wanda_variant": cfg.wanda_variant,
                                "blocksize": cfg.blocksize, "percdamp": cfg.percdamp}
    if output is not None:
        save_checkpoint(model, tok, output, force=cfg.force, allocation=alloc, report=report,
                        source={"id": info.id, "content_sha256": info.content_sha256, "method": cfg.method})
    mismatched = [(b["name"], r["name"]) for b in rows for r in b["linears"]
                  if r["expected_pruned"] >= 0 and r["pruned"] != r["expected_pruned"]]
    return {"output": str(output) if output else None, "method": cfg.method,
            "allocation": alloc["params"]["allocator"], "pattern": alloc["pattern"],
            "target_sparsity": alloc["achieved"].get("target_sparsity"),
            "allocated_sparsity": alloc["achieved"]["param_weighted_sparsity"],
            "realised_sparsity": report["realised_sparsity"], "pruned_sparsity": report["pruned_sparsity"],
            "preexisting_sparsity": report["preexisting_sparsity"], "mask_mismatches": len(mismatched),
            "blocks": [{"index": b["index"], "target": b["target_sparsity"], "realised": b["sparsity"]} for b in rows],
            "seconds": seconds, "peak_rss_mb": round(peak_rss_mb(), 1),
            "model_mb": round(model_bytes(model) / 2**20, 1), "model": model_dict,
            "_model": model, "_tokenizer": tok}


def nm(cfg: PruneConfig, progress: Any = None) -> dict:
    """N:M semi-structured pruning (uniform, or OWL's mixed N:M from a profile / allocation)."""
    if cfg.pattern is None and cfg.allocation is None:
        raise InputError("owlctl nm needs --pattern N:M (N weights kept per group of M, e.g. 2:4)")
    return prune(cfg, progress)
