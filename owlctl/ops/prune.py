"""`owlctl prune` and `owlctl nm`: score (magnitude | wanda | sparsegpt) x allocation (uniform | owl) x
pattern (unstructured | N:M | mixed N:M), one layer-by-layer driver for every combination (SPEC 1.4, 5)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.calibration.prune import prune_model
from owlctl.engine.calibration.to_disk import block_saver, finish_checkpoint, weights_writer
from owlctl.errors import InputError
from owlctl.options import (
    ALLOCATION,
    BALANCE,
    CLAMP,
    FORCE,
    FROM_PROFILE,
    LAMBDA,
    METHOD,
    MODEL,
    OUTLIER_M,
    OUTPUT,
    PATTERN,
    SPECIAL,
    TARGET_SPARSITY,
    CalibrationOptions,
    ComputeOptions,
    WandaGroup,
    opt,
)

# `owlctl nm` shows these PruneConfig options; `owlctl prune` all but --pattern and --special.
NM_ONLY = ("pattern", "special")
PRUNE_ONLY = ("uniform", "target_sparsity", "balance", "clamp", "wanda_group", "wanda_variant")


@dataclass(frozen=True, kw_only=True)
class PruneConfig(ComputeOptions, CalibrationOptions):
    model: str = MODEL()
    output: Path | None = OUTPUT(help="Checkpoint directory to write.")
    pattern: str | None = PATTERN(None)  # "N:M", N kept
    method: str = METHOD("wanda")
    # allocation: exactly one of allocation file, profile (OWL), or uniform
    uniform: bool = opt("--uniform", help="Same sparsity S for every block.")(False)
    from_profile: Path | None = FROM_PROFILE(None)
    allocation: Path | None = ALLOCATION(None)
    target_sparsity: float | None = TARGET_SPARSITY(None)
    outlier_m: float | None = OUTLIER_M(None)
    lam: float | None = LAMBDA(None)
    special: bool = SPECIAL(False)
    balance: str = BALANCE("blocks")
    clamp: str = CLAMP("redistribute")
    max_sparsity: float = 0.99
    # method options
    wanda_group: str = opt("--wanda-group", help="Wanda comparison group: row (reference) | matrix.",
                           choices=WandaGroup)("row")
    wanda_variant: bool = opt("--wanda-variant", help="Wanda's cumulative-mass variant.")(False)
    blocksize: int = opt("--blocksize", help="SparseGPT column block.", min=1)(128)
    percdamp: float = opt("--percdamp", help="SparseGPT damping (x mean diag H).", min=0.0)(0.01)
    force: bool = FORCE(False)


def _validate(cfg: PruneConfig) -> None:
    from owlctl.ops.checks import check_owl_knobs, prune_pattern
    from owlctl.options import (
        Balance,
        Bos,
        Clamp,
        Method,
        WandaGroup,
        check_choice,
        check_compute,
        finite,
    )

    check_choice("--method", cfg.method, Method)
    check_choice("--balance", cfg.balance, Balance)
    check_choice("--clamp", cfg.clamp, Clamp)
    check_choice("--wanda-group", cfg.wanda_group, WandaGroup)
    check_choice("--bos", cfg.bos, Bos)
    check_compute(cfg)
    chosen = [x for x in (cfg.allocation is not None, cfg.from_profile is not None, cfg.uniform) if x]
    if len(chosen) != 1:
        raise InputError("choose exactly one allocation: --allocation FILE, --from-profile PROFILE, or --uniform",
                         hint="e.g. `owlctl prune MODEL --method wanda --uniform -s 0.5 -o out`")
    if cfg.target_sparsity is not None and not (0.0 <= cfg.target_sparsity < 1.0):
        raise InputError(f"--target-sparsity must be a fraction in [0, 1), got {cfg.target_sparsity}",
                         hint="70% sparsity is -s 0.7")
    check_owl_knobs(cfg.outlier_m, cfg.lam)
    prune_pattern(cfg.pattern)
    if cfg.pattern is None and cfg.allocation is None and cfg.target_sparsity is None:
        raise InputError("--target-sparsity is required for unstructured pruning", hint="e.g. -s 0.7")
    if cfg.wanda_variant and cfg.pattern is not None:
        raise InputError("--wanda-variant is for unstructured sparsity only")
    finite("--percdamp", cfg.percdamp, lo=0.0)
    if cfg.batch_size < 1 or cfg.blocksize < 1:
        raise InputError("--batch-size and --blocksize must be >= 1")


PROFILE_FIX = "owlctl profile MODEL -o profile.json"
ALLOCATION_FIX = "owlctl allocate PROFILE -s S -o allocation.json"


def _early_allocation(cfg: PruneConfig, config: dict) -> dict | None:
    """The OWL allocation from --from-profile, or the --allocation document, read and checked against the
    model's config.json before any weight is read (a missing M, a profile of another model, ...)."""
    blocks = config.get("num_hidden_layers", config.get("n_layer"))
    if cfg.from_profile is not None:
        from owlctl.engine.allocation import allocation_from_profile
        from owlctl.formats.profile import read_profile

        prof, sha = read_profile(cfg.from_profile)
        _check_blocks(prof["model"], blocks, f"profile {cfg.from_profile}", PROFILE_FIX)
        return allocation_from_profile(prof, sha, str(cfg.from_profile), target_sparsity=cfg.target_sparsity,
                                       outlier_m=cfg.outlier_m, lam=cfg.lam, pattern=cfg.pattern,
                                       balance=cfg.balance, clamp=cfg.clamp, max_sparsity=cfg.max_sparsity,
                                       special=cfg.special)
    if cfg.allocation is not None:
        from owlctl.formats.allocation import read_allocation

        doc, _sha = read_allocation(cfg.allocation)
        _check_blocks(doc["model"], blocks, f"allocation {cfg.allocation}", ALLOCATION_FIX)
        return doc
    return None


def _check_blocks(recorded: dict, blocks: Any, what: str, fix: str) -> None:
    got = recorded.get("num_blocks")
    if not isinstance(got, int):
        raise InputError(f"{what} does not record the model's block count (model.num_blocks)",
                         hint=f"it was not written by owlctl, or was edited; re-create it with `{fix}`")
    if isinstance(blocks, int) and got != blocks:
        raise InputError(f"{what} has {got} blocks but the model has {blocks}",
                         hint=f"it was made for another model; re-create it with `{fix}`")


def _allocation(cfg: PruneConfig, info: Any, layout: Any, early: dict | None) -> dict:
    from owlctl.engine.allocation import uniform_allocation

    numels = [sum(lin.weight.numel() for lin in layout.linears(i).values()) for i in range(layout.num_blocks)]
    names = [layout.block_name(i) for i in range(layout.num_blocks)]
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    if cfg.uniform:
        return uniform_allocation(model_dict, names, numels, target_sparsity=cfg.target_sparsity, pattern=cfg.pattern)
    assert early is not None
    what, fix = ((f"profile {cfg.from_profile}", PROFILE_FIX) if cfg.from_profile is not None
                 else (f"allocation {cfg.allocation}", ALLOCATION_FIX))
    _check_same_model(early["model"], model_dict, what, fix)
    return early


def _check_same_model(recorded: dict, actual: dict, what: str, fix: str) -> None:
    _check_blocks(recorded, actual["num_blocks"], what, fix)
    if recorded.get("content_sha256") and recorded["content_sha256"] != actual["content_sha256"]:
        raise InputError(f"{what} was made for another model ({recorded.get('id')}, hash "
                         f"{recorded['content_sha256'][:12]}) than this one ({actual['id']}, hash "
                         f"{actual['content_sha256'][:12]})", hint=f"re-create it with `{fix}`")


def prune(cfg: PruneConfig, progress: Any = None, command: str = "prune") -> dict:
    """Prune and save a checkpoint (when ``output`` is set). Returns the summary document.

    Order: every check that needs no weights (options, config.json shapes and context, the profile or
    allocation against the model, the output location), then the calibration tokens, then the weights."""
    from owlctl.engine.distributed import reporting, session
    from owlctl.ops.common import hub_of

    _validate(cfg)
    with hub_of(cfg), session(command, cfg) as world:  # several processes: rank 0 writes and reports
        return _prune_checked(cfg, progress if reporting(world) else None, command, world)


def _prune_checked(cfg: PruneConfig, progress: Any, command: str, world: Any = None) -> dict:
    from owlctl.core.methods import get
    from owlctl.engine.distributed import reporting
    from owlctl.engine.models import model_config
    from owlctl.ops.checks import check_pattern_fits, check_seqlen, context_length, model_inputs, prune_pattern
    from owlctl.ops.common import calib_defaults, output_claim, weights_bytes

    t_start = time.perf_counter()
    output = Path(cfg.output) if cfg.output is not None and reporting(world) else None
    config, local = model_config(cfg.model)
    check_pattern_fits(prune_pattern(cfg.pattern), config, cfg.model)
    needs_data = bool(get(cfg.method).needs)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples, cfg.seqlen,
                                              context_length(config))
    if needs_data:
        check_seqlen(seqlen, config, cfg.model)
    early = _early_allocation(cfg, config)
    if early is not None and early["pattern"]["kind"] == "nm":
        check_pattern_fits((early["pattern"]["n_keep"], early["pattern"]["m"]), config, cfg.model)
    inputs = model_inputs(cfg.model) + [cfg.from_profile, cfg.allocation]
    with output_claim(output, cfg.force, "dir", inputs=inputs, need_bytes=weights_bytes(local)) as claim:
        return _prune_claimed(cfg, claim, early, (source, nsamples, seqlen) if needs_data else None, t_start,
                              progress, command, output, world)


def _prune_claimed(cfg: PruneConfig, claim: Any, early: dict | None, calib_args: tuple | None,
                   t_start: float, progress: Any, command: str, output: Path | None, world: Any) -> dict:
    from owlctl.core.methods import MethodOptions
    from owlctl.engine.models import open_model, resolve_device
    from owlctl.formats.checkpoint import report_doc
    from owlctl.ops.common import model_bytes, peak_rss_mb

    device = resolve_device(cfg.device)
    opts = MethodOptions(wanda_group=cfg.wanda_group, wanda_variant=cfg.wanda_variant, blocksize=cfg.blocksize,
                         percdamp=cfg.percdamp)
    t0 = time.perf_counter()
    calib = _calibration(cfg, early, calib_args)  # tokens before weights: a bad corpus fails before a long load
    t_calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    host, tok, info = open_model(cfg.model, cfg.dtype, cfg.offload)
    try:
        layout = host.layout
        alloc = _allocation(cfg, info, layout, early)  # checks the allocation against the model before any work
        t_load = time.perf_counter() - t0
        writer = weights_writer(claim.tmp, host, info, alloc) if output is not None else None
        try:
            rows, timings = prune_model(host, alloc, cfg.method, opts, calib, device=device,
                                        batch_size=cfg.batch_size, progress=progress,
                                        after=block_saver(writer, host) if writer is not None else None,
                                        activations=cfg.offload_activations)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        model_dict = info.as_dict(layout.family.name, layout.num_blocks)
        seconds = {"load": round(t_load, 3), "calibration_data": round(t_calib, 3), **timings.as_dict(),
                   "total": round(time.perf_counter() - t_start, 3)}
        if world is not None:
            seconds["collectives"] = round(world.collective_s, 3)
        report = report_doc(model_dict, cfg.method, alloc["pattern"], rows, seconds, command=command)
        report["calibration"] = calib.as_dict() if calib is not None else None
        report["method_options"] = {"wanda_group": cfg.wanda_group, "wanda_variant": cfg.wanda_variant,
                                    "blocksize": cfg.blocksize, "percdamp": cfg.percdamp}
        if writer is not None:
            from owlctl.progress import note

            note(f"writing {output}")
            finish_checkpoint(writer, claim.tmp, host, tok, info, alloc, report, cfg.method)
            claim.commit()
        return _summary(report, alloc, output, peak_rss_mb(), model_bytes(host.model))
    finally:
        host.close()


def _calibration(cfg: PruneConfig, early: dict | None, calib_args: tuple | None) -> Any:
    from owlctl.engine.data import calibration
    from owlctl.engine.models import load_tokenizer, local_dir
    from owlctl.ops.common import resolve_bos, warn

    if calib_args is None:
        return None
    tok0 = load_tokenizer(local_dir(cfg.model)[0])
    bos = resolve_bos(tok0, cfg.bos)
    prof_bos = (((early or {}).get("profile") or {}).get("calibration") or {}).get("bos")
    if prof_bos is not None and prof_bos != bos:
        warn(f"the profile was calibrated with --bos {prof_bos}, this pruning run calibrates with --bos {bos}")
    return calibration(calib_args[0], tok0, *calib_args[1:], cfg.seed, bos=bos, bos_requested=cfg.bos)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _summary(report: dict, alloc: dict, output: Path | None, peak_mb: float, model_b: int) -> dict:
    """The owlctl.prune document: what was asked, allocated and realised, per block, with the mask check."""
    from owlctl.engine.memory import peak_cuda_mb
    from owlctl.formats._io import header

    mismatched = [(b["name"], r["name"]) for b in report["blocks"] for r in b["linears"]
                  if r["expected_pruned"] >= 0 and r["pruned"] != r["expected_pruned"]]
    return {**header("prune", report["command"], report["model"], report["seconds"]),
            "output": str(output) if output else None, "method": report["method"],
            "allocator": alloc["params"]["allocator"], "pattern": alloc["pattern"],
            "target_sparsity": alloc["target_sparsity"], "allocated_sparsity": alloc["allocated_sparsity"],
            "realised_sparsity": report["realised_sparsity"], "pruned_sparsity": report["pruned_sparsity"],
            "preexisting_sparsity": report["preexisting_sparsity"], "mask_mismatches": len(mismatched),
            "blocks": [{"index": b["index"], "target_sparsity": b["target_sparsity"],
                        "realised_sparsity": b["realised_sparsity"]} for b in report["blocks"]],
            "calibration": report["calibration"], "peak_rss_mb": round(peak_mb, 1),
            "model_mb": round(model_b / 2**20, 1), "peak_cuda_mb": _round(peak_cuda_mb())}


def nm(cfg: PruneConfig, progress: Any = None) -> dict:
    """N:M semi-structured pruning (uniform, or OWL's mixed N:M from a profile / allocation)."""
    import dataclasses

    if cfg.pattern is None and cfg.allocation is None:
        raise InputError("owlctl nm needs --pattern N:M (N weights kept per group of M, e.g. 2:4)")
    if cfg.from_profile is None and cfg.allocation is None and not cfg.uniform:
        cfg = dataclasses.replace(cfg, uniform=True)  # plain N:M: every block the same pattern
    return prune(cfg, progress, command="nm")
