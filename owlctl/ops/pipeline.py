"""`owlctl pipeline`: the main job in one command — profile, allocate (uniform and OWL), prune both ways,
evaluate dense / uniform / OWL on identical held-out windows, print the comparison.

The model is loaded and the calibration set tokenised once; the profile is one dense pass; each pruned
variant starts from a fresh copy of the dense weights. With ``output`` set, the profile, both allocations,
the result document and (with ``save_checkpoints``) both checkpoints are written into that folder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError


@dataclass(frozen=True)
class PipelineConfig:
    model: str = "builtin:smollm2-135m"
    method: str = "wanda"
    target_sparsity: float = 0.7
    outlier_m: float = 5.0
    lam: float = 0.08
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    bos: str = "auto"  # calibration and evaluation windows (engine/data.py); never = the reference protocol
    batch_size: int = 8
    eval_data: str | None = None
    eval_split: str = "test"
    eval_seqlen: int | None = None
    max_windows: int | None = None
    output: Path | None = None
    save_checkpoints: bool = False
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False


BUILTIN_PIPELINE = {"nsamples": 16, "seqlen": 256, "max_windows": 16}  # eval windows of 512 tokens

FULL_SIZE_HINT = ("full-size protocol (GPU): owlctl pipeline meta-llama/Llama-2-7b-hf --calib c4 --nsamples 128 "
                  "--seqlen 2048 --eval-data wikitext2 --eval-seqlen 2048 --device cuda -s 0.7 -m 5 -l 0.08")


def pipeline(cfg: PipelineConfig, progress: Any = None, log: Any = None) -> dict:
    from owlctl.core.methods import METHODS

    if cfg.method not in METHODS:
        raise InputError(f"unknown method {cfg.method!r}", hint="use one of: " + ", ".join(METHODS))
    if not 0.0 < cfg.target_sparsity < 1.0:
        raise InputError(f"--target-sparsity must be in (0, 1), got {cfg.target_sparsity}")
    if cfg.output is not None:
        from owlctl.formats._io import check_output

        check_output(cfg.output, cfg.force)
    say = log or (lambda _m: None)

    from owlctl.core.methods import MethodOptions
    from owlctl.engine.data import calibration
    from owlctl.engine.loading import is_builtin, load_model, resolve_device
    from owlctl.families import resolve
    from owlctl.formats._io import header
    from owlctl.ops.allocate import allocation_from_profile, uniform_allocation
    from owlctl.ops.common import calib_defaults, now, peak_rss_mb, resolve_bos
    from owlctl.ops.evaluate import check_calibration_overlap, eval_defaults, evaluate_loaded, token_streams
    from owlctl.ops.profile import profile_model
    from owlctl.ops.prune import prune_model

    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    say(f"loading {cfg.model}")
    base, tok, info = load_model(cfg.model, cfg.dtype)
    layout = resolve(base)
    builtin = is_builtin(info.id)
    # On the built-in model the defaults are sized for a 2-core CPU (the whole job in a few minutes).
    nsamples_default = cfg.nsamples or (BUILTIN_PIPELINE["nsamples"] if builtin else None)
    seqlen_default = cfg.seqlen or (BUILTIN_PIPELINE["seqlen"] if builtin else None)
    max_windows = cfg.max_windows or (BUILTIN_PIPELINE["max_windows"] if builtin else None)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, nsamples_default, seqlen_default)
    data, eval_seqlen = eval_defaults(info.id, [cfg.eval_data] if cfg.eval_data else None, cfg.eval_seqlen)
    bos = resolve_bos(tok, cfg.bos)
    streams = token_streams(data, cfg.eval_split, tok, bos)  # fail on bad eval data before any heavy work
    calib = calibration(source, tok, nsamples, seqlen, cfg.seed, bos=bos, bos_requested=cfg.bos)
    overlap = check_calibration_overlap([calib.as_dict()], data, cfg.eval_split)
    seconds["load"] = round(time.perf_counter() - t_start, 2)

    t0 = time.perf_counter()
    say(f"profiling ({nsamples} x {seqlen} tokens of {source})")
    prof, _ = profile_model(base, tok, info, calib, outlier_m=tuple(sorted({3.0, 5.0, 7.0, float(cfg.outlier_m)})),
                            device=device, batch_size=cfg.batch_size, progress=progress)
    seconds["profile"] = round(time.perf_counter() - t0, 2)
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    numels = [b["numel"] for b in prof["blocks"]]
    names = [b["name"] for b in prof["blocks"]]
    allocs = {
        "uniform": uniform_allocation(model_dict, names, numels, target_sparsity=cfg.target_sparsity),
        "owl": allocation_from_profile(prof, None, None, target_sparsity=cfg.target_sparsity,
                                       outlier_m=cfg.outlier_m, lam=cfg.lam),
    }

    def run_eval(model: Any, label: str) -> dict:
        t = time.perf_counter()
        say(f"evaluating {label} on {', '.join(data)} ({cfg.eval_split} split, seqlen {eval_seqlen})")
        res = evaluate_loaded(model, tok, data=data, split=cfg.eval_split, seqlen=eval_seqlen,
                              batch_size=cfg.batch_size, max_windows=max_windows, device=device,
                              streams=streams, progress=progress, bos=bos)
        seconds[f"eval_{label}"] = round(time.perf_counter() - t, 2)
        return res["perplexity"]

    rows: list[dict] = []
    dense_ppl = run_eval(base, "dense")
    rows.append({"variant": "dense", "perplexity": {k: v["ppl"] for k, v in dense_ppl.items()},
                 "windows": {k: v["windows"] for k, v in dense_ppl.items()}, "realised_sparsity": 0.0,
                 "block_sparsity_min": 0.0, "block_sparsity_max": 0.0, "prune_seconds": 0.0})
    opts = MethodOptions()
    checkpoints: dict[str, str] = {}
    for label, alloc in allocs.items():
        model = copy.deepcopy(base)
        lay = resolve(model)
        t0 = time.perf_counter()
        say(f"pruning with {cfg.method}, {label} allocation, target {cfg.target_sparsity:.0%}")
        blocks, _ = prune_model(model, lay, alloc, cfg.method, opts, calib, device=device,
                                batch_size=cfg.batch_size, progress=progress)
        seconds[f"prune_{label}"] = round(time.perf_counter() - t0, 2)
        ppl = run_eval(model, label)
        total = sum(b["numel"] for b in blocks)
        rows.append({"variant": f"{cfg.method} {label}", "perplexity": {k: v["ppl"] for k, v in ppl.items()},
                     "windows": {k: v["windows"] for k, v in ppl.items()},
                     "realised_sparsity": sum(b["zeros"] for b in blocks) / total,
                     "preexisting_sparsity": sum(b["preexisting_zeros"] for b in blocks) / total,
                     "block_sparsity_min": min(b["sparsity"] for b in blocks),
                     "block_sparsity_max": max(b["sparsity"] for b in blocks),
                     "prune_seconds": seconds[f"prune_{label}"]})
        if cfg.output is not None and cfg.save_checkpoints:
            from owlctl.formats.checkpoint import report_doc, save_checkpoint

            out = Path(cfg.output) / f"{cfg.method}-{label}"
            report = report_doc(model_dict, cfg.method, alloc["pattern"], blocks, {})
            report["calibration"] = calib.as_dict()  # so `owlctl eval` can refuse overlapping text
            save_checkpoint(model, tok, out, force=True, allocation=alloc, report=report,
                            source={"id": info.id, "content_sha256": info.content_sha256, "method": cfg.method})
            checkpoints[label] = str(out)
        del model

    seconds["total"] = round(time.perf_counter() - t_start, 2)
    doc = {**header("pipeline"), "created": now(), "model": model_dict, "method": cfg.method,
           "target_sparsity": cfg.target_sparsity, "outlier_m": cfg.outlier_m, "lambda": cfg.lam,
           "calibration": calib.as_dict(),
           "evaluation": {"data": list(data), "split": cfg.eval_split, "seqlen": eval_seqlen,
                          "max_windows": max_windows, "bos": bos, "bos_requested": cfg.bos,
                          "calibration_overlap": overlap},
           "results": rows, "owl_block_sparsity": [b["sparsity"] for b in allocs["owl"]["blocks"]],
           "outlier_pct": [b["outlier_pct"] for b in allocs["owl"]["blocks"]],
           "checkpoints": checkpoints, "seconds": seconds, "peak_rss_mb": round(peak_rss_mb(), 1),
           "full_size_hint": FULL_SIZE_HINT}
    if cfg.output is not None:
        from owlctl.formats._io import write_json

        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "profile.json", prof, force=True)
        for label, alloc in allocs.items():
            write_json(out / f"allocation-{label}.json", alloc, force=True)
        write_json(out / "pipeline.json", doc, force=True)
    return doc
