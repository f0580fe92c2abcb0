"""The part of `owlctl search` that runs once the output is claimed: tokens, weights, profile, database,
search, the real-prune check, and the allocation document."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from owlctl.engine.search.run import OBJECTIVE, SearchJob

DEFAULT_MS = (3.0, 5.0, 7.0, 9.0)  # of the OWL seeds, where profiled (else every profiled M)
DEFAULT_LAMBDAS = (0.04, 0.08, 0.12, 0.16)
DEFAULT_NM_LAMBDAS = (1.0, 2.0, 3.0)


def run_claimed(cfg: Any, budget: Any, nm: tuple[int, int] | None, calib_args: tuple, profile: tuple | None,
                db: Path, t_start: float, progress: Any) -> dict:
    from owlctl.core.methods import MethodOptions
    from owlctl.engine.calibration.profile import profile_model
    from owlctl.engine.data import calibration
    from owlctl.engine.models import load_model, load_tokenizer, local_dir, resolve_device
    from owlctl.engine.search.evolve import EvolveSettings
    from owlctl.engine.search.objective import heldout_windows
    from owlctl.families import resolve
    from owlctl.ops.common import resolve_bos
    from owlctl.ops.profile import DEFAULT_MS as PROFILE_MS

    device = resolve_device(cfg.device)
    tok0 = load_tokenizer(local_dir(cfg.model)[0])
    bos = resolve_bos(tok0, cfg.bos)
    calib = calibration(calib_args[0], tok0, calib_args[1], calib_args[2], cfg.seed, bos=bos, bos_requested=cfg.bos)
    obj_source = cfg.objective_data or calib_args[0]
    wins = heldout_windows(obj_source, cfg.objective_split, tok0, cfg.objective_seqlen, cfg.objective_windows, bos)
    model, tok, info = load_model(cfg.model, cfg.dtype)
    layout = resolve(model)
    if profile is None:
        from owlctl.engine.models.hosts import InMemory

        doc, _ = profile_model(InMemory(model, layout), tok, info, calib, outlier_m=PROFILE_MS, device=device,
                               batch_size=cfg.batch_size, progress=progress, command="search",
                               activations=cfg.offload_activations)
        profile = (doc, None, None)
    numels = [sum(lin.weight.numel() for lin in layout.linears(i).values()) for i in range(layout.num_blocks)]
    space = _space(cfg, nm, numels)
    opts = MethodOptions()
    job = SearchJob(method=cfg.method, opts=opts, space=space,
                    outlier_ms=tuple(cfg.outlier_ms or _seed_ms(profile[0]["outlier_m"])),
                    lambdas=tuple(cfg.lambdas or (DEFAULT_NM_LAMBDAS if nm else DEFAULT_LAMBDAS)),
                    balance=cfg.balance, budget=budget,
                    settings=EvolveSettings(cfg.offspring, cfg.survivors, cfg.max_swaps, cfg.seed),
                    topk=cfg.topk, db=db, owl_only=cfg.mode == "owl-grid", verify=cfg.verify,
                    activations=cfg.offload_activations)
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    store = _store(db, cfg, job, calib, model_dict, opts, numels)
    obj_data = {"source": obj_source, "split": cfg.objective_split, "windows": int(wins.shape[0]),
                "seqlen": cfg.objective_seqlen, "topk": cfg.topk, "bos": bos}
    return _search_and_document(model, layout, calib, wins, profile, store, job, cfg, model_dict, obj_data,
                                device, t_start, progress)


def _seed_ms(profiled: list[float]) -> tuple[float, ...]:
    return tuple(m for m in DEFAULT_MS if m in profiled) or tuple(profiled)


def _space(cfg: Any, nm: tuple[int, int] | None, numels: list[int]) -> Any:
    from owlctl.engine.search.space import nm_space, unstructured_space

    if nm is not None:
        return nm_space(nm[0], nm[1], cfg.nm_spread, numels, cfg.balance)
    return unstructured_space(cfg.target_sparsity, cfg.level_step, cfg.spread, 0.99, numels, cfg.balance)


def _store(db: Path, cfg: Any, job: SearchJob, calib: Any, model_dict: dict, opts: Any, numels: list[int]) -> Any:
    """The level database, created or reused when it was built from exactly these settings."""
    import dataclasses

    from owlctl.engine.search.database import open_store

    space = job.space
    manifest = {"kind": "owlctl search level database", "version": 1, "built_from": "uniform path",
                "model_sha256": model_dict["content_sha256"], "num_blocks": model_dict["num_blocks"],
                "numels": numels, "method": cfg.method, "method_options": dataclasses.asdict(opts),
                "pattern": None if space.nm is None else list(space.nm),
                "levels": {str(k): space.value(k) for k in space.levels}, "dtype": cfg.dtype,
                "calibration": {"tokens_sha256": calib.sha256, "batch_size": cfg.batch_size}}
    return open_store(db, manifest, cfg.cache_mb)


def _search_and_document(model: Any, layout: Any, calib: Any, wins: Any, profile: tuple, store: Any, job: SearchJob,
                         cfg: Any, model_dict: dict, obj_data: dict, device: str, t_start: float,
                         progress: Any) -> dict:
    from owlctl.engine.search.objective import windows_sha256
    from owlctl.engine.search.run import run_search, verify
    from owlctl.progress import note

    result = run_search(model, layout, calib, wins, profile[0], store, job, device=device,
                        batch_size=cfg.batch_size, t_start=t_start, progress=progress)
    out = result["outcome"]
    obj_data["windows_sha256"] = windows_sha256(wins)
    doc = _document(out.winner, out, job, cfg, profile, model_dict, calib)
    uniform = next(s["objective"] for s in out.seeds if s["name"] == "uniform")
    verified = None
    if job.verify:
        t0 = time.perf_counter()
        note("checking the winner with a real prune")
        real = verify(model, layout, doc, job, calib, wins, result, device=device, batch_size=cfg.batch_size)
        result["seconds"]["verify"] = time.perf_counter() - t0
        chosen = "search" if real <= uniform else "uniform"
        verified = {"objective": real, "database_objective": out.objective, "uniform_objective": uniform,
                    "chosen": chosen}
        if chosen == "uniform":
            note(f"the winner pruned for real scores {real:.6f}, worse than uniform ({uniform:.6f}): keeping uniform")
            doc = _document((0,) * layout.num_blocks, out, job, cfg, profile, model_dict, calib)
    info = _info(out, job, cfg, calib, obj_data, result, verified, uniform)
    doc["params"]["search"] = info
    doc["seconds"] = {k: round(v, 3) for k, v in result["seconds"].items()}
    return doc


def _document(offsets: tuple, out: Any, job: SearchJob, cfg: Any, profile: tuple, model_dict: dict,
              calib: Any) -> dict:
    """The allocation document of ``offsets`` (owl-grid mode: OWL's own allocation for the best seed)."""
    from owlctl.engine.allocation import allocation_from_profile
    from owlctl.formats.allocation import build_allocation_doc
    from owlctl.formats.profile import block_names, block_numels, block_ratios, m_key

    prof, sha, path = profile
    space = job.space
    best = next((s for s in out.seeds if tuple(s["offsets"]) == tuple(offsets)), None)
    pattern = {"kind": "unstructured"} if space.nm is None else {"kind": "nm", "n_keep": space.nm[0],
                                                                 "m": space.nm[1]}
    if job.owl_only and best is not None and best["name"] != "uniform":
        doc = allocation_from_profile(prof, sha, path, target_sparsity=None if space.nm else space.base,
                                      outlier_m=best["outlier_m"], lam=best["lambda"], pattern=cfg.pattern,
                                      balance=cfg.balance, command="search")
        doc["model"] = model_dict
        return doc
    has5 = m_key(5.0) in {m_key(m) for m in prof["outlier_m"]}
    params = {"allocator": "uniform" if job.owl_only else "search", "target_sparsity": None if space.nm else space.base, "outlier_m": None,
              "lambda": None, "balance": cfg.balance, "clamp": "none",
              "min_sparsity": min(space.sparsity(space.k_lo), space.sparsity(space.k_hi)),
              "max_sparsity": max(space.sparsity(space.k_lo), space.sparsity(space.k_hi)), "special": False}
    values = [space.value(k) for k in offsets]
    return build_allocation_doc(
        block_names=block_names(prof), block_numels=block_numels(prof),
        outlier_pcts=block_ratios(prof, 5.0) if has5 else None, model=model_dict, params=params, pattern=pattern,
        sparsities=None if space.nm else values, n_keeps=[int(v) for v in values] if space.nm else None,
        profile_sha256=sha, profile_path=path, profile_calibration=calib.as_dict(), command="search")


def _info(out: Any, job: SearchJob, cfg: Any, calib: Any, obj_data: dict, result: dict, verified: dict | None,
          uniform: float) -> dict:
    import dataclasses

    space = job.space
    best = min(out.seeds, key=lambda s: s["objective"])
    data_sha = hashlib.sha256(f"{calib.sha256}|{obj_data['windows_sha256']}".encode()).hexdigest()
    chosen = verified["chosen"] if verified else "search"
    if job.owl_only and chosen == "search":
        chosen = best["name"]
    return {
        "mode": "owl-grid" if job.owl_only else "evolve", "objective": "kl", "definition": OBJECTIVE,
        "objective_data": obj_data, "method": job.method, "method_options": dataclasses.asdict(job.opts),
        "levels": {"built_from": "uniform path", "step": space.step, "values": [space.value(k) for k in space.levels]},
        "budget": job.budget.as_dict(), "seed": cfg.seed, "calibration_sha256": calib.sha256, "data_sha256": data_sha,
        "seeds": [{"name": s["name"], "outlier_m": s["outlier_m"], "lambda": s["lambda"],
                   "offsets": list(s["offsets"]), "objective": s["objective"]} for s in out.seeds],
        "uniform_objective": uniform, "best_seed": best["name"], "best_seed_objective": best["objective"],
        "winner_objective": out.objective, "evaluations": out.evaluations, "generations": len(out.rounds),
        "improvements": out.improvements, "stopped": out.stopped, "window_forwards": result["window_forwards"], "rounds": out.rounds,
        "verified": verified, "chosen": chosen, "database": str(job.db),
        "seconds": {k: round(v, 3) for k, v in result["seconds"].items()},
    }
