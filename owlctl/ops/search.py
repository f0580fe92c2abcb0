"""`owlctl search`: per-block sparsities (or per-block N of mixed N:M) found by an evolutionary search on a
held-out objective, written as an ordinary allocation file that `prune --allocation` / `nm --allocation`
use unchanged. The engine part is owlctl.engine.search (space, database, objective, evolution)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError
from owlctl.options import (
    BALANCE,
    FORCE,
    FROM_PROFILE,
    METHOD,
    MODEL,
    OUTPUT,
    PATTERN,
    TARGET_SPARSITY,
    CalibrationOptions,
    Choice,
    ComputeOptions,
    Split,
    opt,
    parse_floats,
)


class SearchMode(Choice):
    evolve = "evolve"
    owl_grid = "owl-grid"


def parse_budget(text: Any) -> Any:
    """"20m" / "1.5h" / "90s" -> Budget(seconds); "300" -> Budget(evaluations). Zero or less is refused."""
    from owlctl.engine.search.evolve import Budget

    if isinstance(text, Budget):
        return text
    s = str(text).strip().lower()
    hint = "e.g. --budget 20m (minutes of wall time) or --budget 300 (children evaluated)"
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?", s)
    if not m:
        raise InputError(f"--budget {text!r} is neither minutes (20m) nor a number of evaluations (300)", hint=hint)
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise InputError(f"--budget must be positive, got {text!r}", hint=hint)
    if unit is None:
        if value != int(value):
            raise InputError(f"--budget {text!r}: a number of evaluations is a whole number", hint=hint)
        return Budget(evaluations=int(value))
    return Budget(seconds=value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit])


@dataclass(frozen=True, kw_only=True)
class SearchConfig(ComputeOptions, CalibrationOptions):
    model: str = MODEL()
    output: Path | None = OUTPUT(None, help="Allocation JSON to write (for prune/nm --allocation).")
    method: str = METHOD("wanda")
    target_sparsity: float | None = TARGET_SPARSITY(None)
    pattern: str | None = PATTERN(None, help="Mixed N:M: search one N per block around this N:M (N kept per "
                                  "group of M; the reference's '5:8' is 3:8 here).")
    balance: str = BALANCE("blocks")
    from_profile: Path | None = FROM_PROFILE(None, help="Profile for the OWL seeds (default: profile in-process).")
    budget: Any = opt("--budget", help="Wall time of the whole command, profile, database and seeds included "
                      "(20m, 1.5h, 90s; a resumed run continues the clock), or children to evaluate (300).",
                      parse=parse_budget, cli_type=str)("20m")
    db: Path | None = opt("--db", help="Level database directory, kept for resuming and reuse (default: "
                          "OUTPUT.search-db beside the output).", metavar="DIR")(None)
    mode: str = opt("--mode", help="evolve: the evolutionary search | owl-grid (cheap): only pick OWL's (M, "
                    "lambda) from the seed grid, or uniform, on the objective; writes OWL's own allocation.",
                    choices=SearchMode)("evolve")
    outlier_ms: tuple[float, ...] | None = opt("--seed-m", help="M values of the OWL seeds (default: those "
                                               "of 3,5,7,9 profiled, else all profiled).", parse=parse_floats, cli_type=str)(None)
    lambdas: tuple[float, ...] | None = opt("--seed-lambda", help="lambda values of the OWL seeds (default: "
                                            "0.04,0.08,0.12,0.16; mixed N:M: 1,2,3).", parse=parse_floats,
                                            cli_type=str)(None)
    level_step: float = opt("--level-step", help="Sparsity between two levels of the grid.", min=0.001,
                            max=0.5)(0.025)
    spread: float = opt("--spread", help="Largest distance of a block's sparsity from the target "
                        "(mixed N:M: --nm-spread).", min=0.0, max=0.99)(0.15)
    nm_spread: int = opt("--nm-spread", help="Mixed N:M: largest distance of a block's N from the base N.",
                         min=1)(2)
    objective_data: str | None = opt("--objective-data", help="Held-out text of the objective (default: the "
                                     "--calib source).")(None)
    objective_split: str = opt("--objective-split", help="Split of --objective-data (the test split is "
                               "refused: it is for `owlctl eval`).", choices=Split)("validation")
    objective_windows: int = opt("--objective-windows", help="Windows of the objective.", min=1)(8)
    objective_seqlen: int = opt("--objective-seqlen", help="Tokens per objective window.", min=2)(256)
    topk: int = opt("--topk", help="Dense tokens kept per position in the KL (the rest pooled).", min=1)(128)
    offspring: int = opt("--offspring", help="Children per generation.", min=1)(8)
    survivors: int = opt("--survivors", help="Children per generation scored on every window.", min=1)(2)
    max_swaps: int = opt("--max-swaps", help="Most level switches in one child.", min=1)(3)
    verify: bool = opt("--verify/--no-verify", help="Prune the winner for real and score it; keep uniform "
                       "if it scores worse.")(True)
    force: bool = FORCE(False)
    cache_mb: float = 1024.0  # assembled blocks kept in memory


def _validate(cfg: SearchConfig) -> Any:
    from owlctl.ops.checks import prune_pattern
    from owlctl.options import Balance, Bos, Method, check_choice, check_compute, finite

    check_choice("--method", cfg.method, Method)
    check_choice("--balance", cfg.balance, Balance)
    check_choice("--bos", cfg.bos, Bos)
    check_choice("--objective-split", cfg.objective_split, Split)
    check_choice("--mode", cfg.mode, SearchMode)
    check_compute(cfg)
    if cfg.offload == "disk":
        raise InputError("search keeps the model in memory: the objective runs the whole model for every "
                         "candidate (the level database itself is on disk, --db)",
                         hint="drop --offload disk (or use --offload none); for a model too large for memory, "
                              "use `owlctl allocate` and prune with --offload disk")
    if cfg.objective_split == "test":
        raise InputError("the search objective never reads the test split: it is the held-out text for "
                         "`owlctl eval`, and choosing an allocation on it would flatter the result",
                         hint="use --objective-split validation (the default)")
    nm = prune_pattern(cfg.pattern)
    if nm is None and cfg.target_sparsity is None:
        raise InputError("--target-sparsity is required for unstructured search", hint="e.g. -s 0.7")
    if nm is not None and cfg.target_sparsity is not None and abs(cfg.target_sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise InputError(f"--target-sparsity {cfg.target_sparsity} conflicts with --pattern {cfg.pattern}",
                         hint="with --pattern the sparsity comes from N:M; drop --target-sparsity")
    finite("--target-sparsity", cfg.target_sparsity, lo=0.0, hi=1.0, hi_open=True)
    finite("--level-step", cfg.level_step, lo=0.0, hi=0.5, lo_open=True)
    finite("--spread", cfg.spread, lo=0.0, hi=1.0, hi_open=True)
    for v in (cfg.lambdas or ()):
        finite("--seed-lambda", v, lo=0.0)
    for v in (cfg.outlier_ms or ()):
        finite("--seed-m", v, lo=0.0, lo_open=True)
    if cfg.output is None and cfg.db is None:
        raise InputError("give -o allocation.json (or at least --db DIR)", hint="e.g. -o search70.json")
    if min(cfg.objective_windows, cfg.objective_seqlen - 1, cfg.topk, cfg.offspring, cfg.survivors,
           cfg.max_swaps, cfg.batch_size, cfg.nm_spread) < 1:
        raise InputError("--objective-windows, --topk, --offspring, --survivors, --max-swaps, --batch-size and "
                         "--nm-spread must be >= 1, --objective-seqlen >= 2")
    return parse_budget(cfg.budget), nm


def search(cfg: SearchConfig, progress: Any = None) -> dict:
    """Run the search and write the allocation (when ``output`` is set); returns the allocation document.

    Order: option checks, config.json checks, the profile, calibration and objective tokens, the output
    location; then the weights."""
    from owlctl.ops.common import hub_of

    t_start = time.perf_counter()
    budget, nm = _validate(cfg)
    with hub_of(cfg):
        return _search(cfg, budget, nm, t_start, progress)


def _search(cfg: SearchConfig, budget: Any, nm: Any, t_start: float, progress: Any) -> dict:
    from owlctl.engine.models import model_config
    from owlctl.ops.checks import check_pattern_fits, check_seqlen, context_length, model_inputs
    from owlctl.ops.common import calib_defaults, output_claim

    config, _local = model_config(cfg.model)
    check_pattern_fits(nm, config, cfg.model)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples, cfg.seqlen, context_length(config))
    check_seqlen(seqlen, config, cfg.model)
    check_seqlen(cfg.objective_seqlen, config, cfg.model, "--objective-seqlen")
    profile = _read_profile(cfg, config)
    db = Path(cfg.db) if cfg.db is not None else Path(f"{cfg.output}.search-db")
    inputs = model_inputs(cfg.model) + [cfg.from_profile]
    with output_claim(cfg.output, cfg.force, "file", inputs=inputs) as claim:
        from owlctl.ops.search_run import run_claimed

        doc = run_claimed(cfg, budget, nm, (source, nsamples, seqlen), profile, db, t_start, progress)
        doc["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
        if claim is not None:
            from owlctl.formats._io import write_claimed

            write_claimed(claim, "allocation", doc)
    return doc


def _read_profile(cfg: SearchConfig, config: dict) -> tuple[dict, str, str] | None:
    if cfg.from_profile is None:
        return None
    from owlctl.formats.profile import read_profile
    from owlctl.ops.prune import PROFILE_FIX, _check_blocks

    prof, sha = read_profile(cfg.from_profile)
    _check_blocks(prof["model"], config.get("num_hidden_layers", config.get("n_layer")),
                  f"profile {cfg.from_profile}", PROFILE_FIX)
    return prof, sha, str(cfg.from_profile)
