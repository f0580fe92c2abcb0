"""`owlctl allocate`: profile.json -> allocation.json (SPEC 3, 4). Pure math, milliseconds, no torch.

Defaults: unstructured M = 5, lambda = 0.08 (the paper's LLaMA-7B setting); mixed N:M M = 6, lambda = 2
(the reference README's N:M example).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from owlctl.engine.allocation import allocation_from_profile
from owlctl.formats.allocation import write_allocation
from owlctl.formats.profile import read_profile
from owlctl.options import (
    ALLOCATOR,
    BALANCE,
    CLAMP,
    FORCE,
    LAMBDA,
    OUTLIER_M,
    OUTPUT,
    PATTERN,
    SPECIAL,
    TARGET_SPARSITY,
    arg,
    opt,
)


@dataclass(frozen=True, kw_only=True)
class AllocateConfig:
    profile: Path = arg("profile.json written by `owlctl profile`.", metavar="PROFILE", show_default=False)()
    output: Path | None = OUTPUT(None, help="Allocation JSON to write.")
    target_sparsity: float | None = TARGET_SPARSITY(None)
    outlier_m: float | None = OUTLIER_M(None)
    lam: float | None = LAMBDA(None)
    allocator: str = ALLOCATOR("owl")
    pattern: str | None = PATTERN(None)
    special: bool = SPECIAL(False)
    balance: str = BALANCE("blocks")
    clamp: str = CLAMP("redistribute")
    min_sparsity: float = opt("--min-sparsity", help="Lowest block sparsity (redistribute).")(0.0)
    max_sparsity: float = opt("--max-sparsity", help="Highest block sparsity (redistribute).")(0.99)
    plot: Path | None = opt("--plot", show_default=False, help="Also draw outlier ratio and sparsity per block "
                            "(.png/.pdf/.svg; needs matplotlib).")(None)
    force: bool = FORCE(False)


def allocate(cfg: AllocateConfig) -> dict:
    """Read the profile, compute the allocation, write it when ``cfg.output`` is set; return the document."""
    from owlctl.formats.claims import check_not_input, check_output

    if cfg.output is not None:
        check_output(cfg.output, cfg.force, "file")
        check_not_input(cfg.output, [cfg.profile])
    doc_in, sha = read_profile(cfg.profile)
    doc = allocation_from_profile(
        doc_in, sha, str(cfg.profile), target_sparsity=cfg.target_sparsity, outlier_m=cfg.outlier_m,
        lam=cfg.lam, allocator=cfg.allocator, pattern=cfg.pattern, balance=cfg.balance, clamp=cfg.clamp,
        min_sparsity=cfg.min_sparsity, max_sparsity=cfg.max_sparsity, special=cfg.special)
    if cfg.output is not None:
        write_allocation(doc, cfg.output, force=cfg.force)
    return doc


