"""`owlctl profile`: one dense calibration pass -> per-block outlier statistics (SPEC 1-2)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError
from owlctl.options import FORCE, MODEL, OUTPUT, CalibrationOptions, ComputeOptions, opt, parse_floats

DEFAULT_MS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)


@dataclass(frozen=True, kw_only=True)
class ProfileConfig(ComputeOptions, CalibrationOptions):
    model: str = MODEL()
    output: Path | None = OUTPUT(None, help="Profile JSON to write.")
    outlier_m: tuple[float, ...] = opt("--outlier-m", "-m", help="Comma-separated M values to count.",
                                       parse=parse_floats, cli_type=str)(DEFAULT_MS)
    force: bool = FORCE(False)


def profile_model(model: Any, tok: Any, info: Any, calib: Any, *, outlier_m: tuple[float, ...], device: str,
                  batch_size: int, progress: Any = None) -> tuple[dict, Any]:
    """Profile a loaded model on given calibration windows; returns (profile document, timings)."""
    from owlctl.core.methods import wanda_scores
    from owlctl.core.outliers import block_outliers
    from owlctl.families import resolve
    from owlctl.formats._io import header
    from owlctl.formats.profile import m_key
    from owlctl.ops.common import now

    layout = resolve(model)
    blocks: list[dict] = []
    keys = [m_key(m) for m in outlier_m]

    def decide(i: int, _block: Any, linears: dict, stats: dict) -> None:
        names = list(linears)
        scores = [wanda_scores(linears[n].weight.detach(), stats[n].act_sq_norm()) for n in names]
        res = block_outliers(scores, list(outlier_m))
        blocks.append({
            "index": i, "name": layout.block_name(i), "numel": res.numel, "mean_score": res.mean_score,
            "score_sum": res.score_sum,
            "outlier_count": dict(zip(keys, res.outlier_count)),
            "outlier_pct": {k: 100.0 * c / res.numel for k, c in zip(keys, res.outlier_count)},
            "linears": [{"name": n, "shape": list(linears[n].weight.shape), "numel": m.numel,
                         "score_sum": m.score_sum, "max_score": m.max_score,
                         "outlier_count": dict(zip(keys, m.outlier_count))}
                        for n, m in zip(names, res.matrices)],
        })

    from owlctl.engine.driver import run_blocks

    timings = run_blocks(model, layout, calib.input_ids, device=device, batch_size=batch_size,
                         needs=frozenset({"act_norm"}), decide=decide, propagate="dense", progress=progress,
                         description="profile")
    doc = {**header("profile"), "created": now(),
           "model": info.as_dict(layout.family.name, layout.num_blocks),
           "calibration": calib.as_dict(),
           "score": {"name": "wanda", "definition": "|W_ij| * sqrt(mean_k ||X_k[:, j]||_2^2)",
                     "outlier_rule": "score > M * block mean (strict)", "pct_units": "percent"},
           "outlier_m": [float(m) for m in outlier_m],
           "blocks": blocks}
    return doc, timings


def profile(cfg: ProfileConfig, progress: Any = None) -> dict:
    """Load the model and calibration data, profile, and write the profile JSON (when ``output`` is set).
    Returns a summary document (``owlctl.profile/1`` document under "profile", plus timings)."""
    from owlctl.engine.models import model_config
    from owlctl.ops.checks import check_seqlen, context_length, model_inputs
    from owlctl.ops.common import calib_defaults, output_claim
    from owlctl.options import Bos, check_choice, check_device, finite

    ms = tuple(sorted(set(cfg.outlier_m)))
    if not ms:
        raise InputError("--outlier-m needs one or more positive values, e.g. 3,4,5,6,7,8,9,10")
    for m in ms:
        finite("--outlier-m", m, lo=0.0, lo_open=True)
    if cfg.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    check_device(cfg.device)
    check_choice("--bos", cfg.bos, Bos)
    t0 = time.perf_counter()
    config, _ = model_config(cfg.model)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples, cfg.seqlen,
                                              context_length(config))
    check_seqlen(seqlen, config, cfg.model)
    with output_claim(cfg.output, cfg.force, "file", inputs=model_inputs(cfg.model)) as claim:
        from owlctl.engine.data import calibration
        from owlctl.engine.models import load_model, load_tokenizer, local_dir, resolve_device
        from owlctl.ops.common import peak_rss_mb, resolve_bos

        device = resolve_device(cfg.device)
        path, _ = local_dir(cfg.model)
        tok0 = load_tokenizer(path)
        calib = calibration(source, tok0, nsamples, seqlen, cfg.seed, bos=resolve_bos(tok0, cfg.bos),
                            bos_requested=cfg.bos)  # before any weight
        model, tok, info = load_model(cfg.model, cfg.dtype)
        t_load = time.perf_counter() - t0
        doc, timings = profile_model(model, tok, info, calib, outlier_m=ms, device=device,
                                     batch_size=cfg.batch_size, progress=progress)
        if claim is not None:
            from owlctl.formats._io import dumps

            claim.tmp.write_text(dumps(doc), encoding="utf-8")
            claim.commit()
    return {"profile": doc, "output": str(cfg.output) if cfg.output else None,
            "seconds": {"load": round(t_load, 3), **timings.as_dict(),
                        "total": round(time.perf_counter() - t0, 3)},
            "peak_rss_mb": round(peak_rss_mb(), 1)}
