"""`owlctl profile`: one dense calibration pass -> per-block outlier statistics (SPEC 1-2)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.calibration.profile import profile_model
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


def profile(cfg: ProfileConfig, progress: Any = None) -> dict:
    """Load the model and calibration data, profile, and write the profile JSON (when ``output`` is set).
    Returns the profile document (with where it was written and the peak memory)."""
    from owlctl.ops.common import hub_of
    from owlctl.options import Bos, check_choice, check_compute, finite

    ms = tuple(sorted(set(cfg.outlier_m)))
    if not ms:
        raise InputError("--outlier-m needs one or more positive values, e.g. 3,4,5,6,7,8,9,10")
    for m in ms:
        finite("--outlier-m", m, lo=0.0, lo_open=True)
    if cfg.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    check_compute(cfg)  # --device, --dtype, --offload, --offload-activations
    check_choice("--bos", cfg.bos, Bos)
    from owlctl.engine.distributed import reporting, session

    with hub_of(cfg), session("profile", cfg) as world:  # several processes: rank 0 writes and reports
        return _profile(cfg, ms, progress if reporting(world) else None, world)


def _profile(cfg: ProfileConfig, ms: tuple[float, ...], progress: Any, world: Any = None) -> dict:
    from owlctl.engine.models import model_config
    from owlctl.ops.checks import check_seqlen, context_length, model_inputs
    from owlctl.ops.common import calib_defaults, output_claim

    t0 = time.perf_counter()
    config, _ = model_config(cfg.model)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples, cfg.seqlen,
                                              context_length(config))
    check_seqlen(seqlen, config, cfg.model)
    output = cfg.output if world is None or world.main else None
    with output_claim(output, cfg.force, "file", inputs=model_inputs(cfg.model)) as claim:
        from owlctl.engine.data import calibration
        from owlctl.engine.memory import peak_cuda_mb
        from owlctl.engine.models import load_tokenizer, local_dir, open_model, resolve_device
        from owlctl.ops.common import peak_rss_mb, resolve_bos

        device = resolve_device(cfg.device)
        path, _ = local_dir(cfg.model)
        tok0 = load_tokenizer(path)
        calib = calibration(source, tok0, nsamples, seqlen, cfg.seed, bos=resolve_bos(tok0, cfg.bos),
                            bos_requested=cfg.bos)  # before any weight
        host, tok, info = open_model(cfg.model, cfg.dtype, cfg.offload)
        t_load = time.perf_counter() - t0
        try:
            doc, _ = profile_model(host, tok, info, calib, outlier_m=ms, device=device, batch_size=cfg.batch_size,
                                   progress=progress, activations=cfg.offload_activations)
        finally:
            host.close()
        doc["seconds"] = {"load": round(t_load, 3), **doc["seconds"], "total": round(time.perf_counter() - t0, 3)}
        if world is not None:
            doc["seconds"]["collectives"] = round(world.collective_s, 3)
        if claim is not None:
            from owlctl.formats._io import write_claimed

            write_claimed(claim, "profile", doc)
    return {**doc, "output": str(output) if output else None, "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_cuda_mb": None if (cuda := peak_cuda_mb()) is None else round(cuda, 1)}
