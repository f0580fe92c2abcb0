"""`owlctl prune` and `owlctl nm`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from owlctl.cli import console
from owlctl.cli.options import (BatchSize, Bos, Calib, Device, Dtype, Force, Json, Lambda, NSamples, OutlierM, Quiet,
                                SeqLen, Seed, TargetSparsity)

PRUNE_HELP = """Prune a model's decoder blocks and save a checkpoint plain transformers loads.

Method (magnitude | wanda | sparsegpt) x allocation: --uniform (every block at S), --from-profile P (OWL:
blocks with more outliers get lower sparsity; allocates in-process and saves allocation.json beside the
checkpoint) or --allocation FILE (from `owlctl allocate`). Blocks are pruned one after another, each seeing
the outputs of the already pruned blocks. Zeros are stored densely; owlctl-report.json holds the realised
sparsity per block and matrix.

\b
Examples:
  owlctl prune builtin:smollm2-135m --method wanda --uniform -s 0.7 -o wanda70
  owlctl prune builtin:smollm2-135m --method wanda --from-profile profile.json -s 0.7 -m 5 -l 0.08 -o owl70
  owlctl prune meta-llama/Llama-2-7b-hf --method sparsegpt --allocation alloc.json --device cuda -o sgpt
"""

NM_HELP = """N:M semi-structured pruning, uniform or OWL's mixed N:M (per-block N, fixed M).

N:M means N weights KEPT in every group of M consecutive inputs of a row (the hardware convention: 2:4 is
50%). The OWL reference writes the number PRUNED: its "5:8" is 3:8 here. With --from-profile, each block
keeps n_keep + round(z - mean z) per group (z spans lambda, in N steps); the achieved mean sparsity is
reported because rounding need not preserve it.

\b
Examples:
  owlctl nm builtin:smollm2-135m --method wanda --pattern 2:4 -o wanda24
  owlctl nm builtin:smollm2-135m --method wanda --from-profile profile.json --pattern 3:8 -l 2 -m 6 -o mixed38
"""


def _run(kind: str, **kw: Any) -> None:
    json_out = kw.pop("json_out")
    console.set_quiet(kw.pop("quiet"))
    from owlctl.ops import prune as prune_ops

    cfg = prune_ops.PruneConfig(**kw)
    res = getattr(prune_ops, kind)(cfg, progress=console.Progress())
    res = {k: v for k, v in res.items() if not k.startswith("_")}
    if json_out:
        console.print_json(res)
    else:
        render_summary(res)


def render_summary(res: dict) -> None:
    from rich.table import Table

    pat = res["pattern"]
    pattern = "unstructured" if pat["kind"] == "unstructured" else f"{pat['n_keep']}:{pat['m']} (kept:group)"
    t = Table(title=f"{res['method']} / {res['allocation']} / {pattern}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("model", res["model"]["id"]),
        ("target sparsity", "-" if res["target_sparsity"] is None else f"{res['target_sparsity']:.4f}"),
        ("allocated (param-weighted)", f"{res['allocated_sparsity']:.4f}"),
        ("realised (all exact zeros)", f"{res['realised_sparsity']:.4f}"),
        ("pruned by the masks", f"{res['pruned_sparsity']:.4f}"),
        ("zero before pruning", f"{res['preexisting_sparsity']:.4f}"),
        ("block sparsity range", f"{min(b['realised'] for b in res['blocks']):.3f} .. "
                                 f"{max(b['realised'] for b in res['blocks']):.3f}"),
        ("masks differing from allocation", str(res["mask_mismatches"])),
        ("time", f"{res['seconds']['total']:.1f} s"),
        ("peak memory (RSS)", f"{res['peak_rss_mb']:.0f} MiB (model {res['model_mb']:.0f} MiB)"),
        ("checkpoint", res["output"] or "(not saved)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.out.print(t)


def register(app: typer.Typer) -> None:
    @app.command("prune", help=PRUNE_HELP)
    @console.handle_errors
    def prune_cmd(
        model: Annotated[str, typer.Argument(help="HF hub id, local model directory, or a built-in model "
                                                  "(builtin:smollm2-135m, builtin:gemma3-270m).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
        method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt")] = "wanda",
        uniform: Annotated[bool, typer.Option("--uniform", help="Same sparsity S for every block.")] = False,
        from_profile: Annotated[Optional[Path], typer.Option("--from-profile", help="OWL from this profile.")] = None,
        allocation: Annotated[Optional[Path], typer.Option("--allocation", help="Per-block allocation JSON.")] = None,
        target_sparsity: TargetSparsity = None,
        outlier_m: OutlierM = None,
        lam: Lambda = None,
        balance: Annotated[str, typer.Option("--balance", help="blocks (reference) | params")] = "blocks",
        clamp: Annotated[str, typer.Option("--clamp", help="redistribute | reference | none")] = "redistribute",
        wanda_group: Annotated[str, typer.Option("--wanda-group", help="row (reference) | matrix")] = "row",
        wanda_variant: Annotated[bool, typer.Option("--wanda-variant", help="Wanda's cumulative-mass variant.")]
        = False,
        blocksize: Annotated[int, typer.Option("--blocksize", help="SparseGPT column block.")] = 128,
        percdamp: Annotated[float, typer.Option("--percdamp", help="SparseGPT damping (x mean diag H).")] = 0.01,
        calib: Calib = None,  # type: ignore[assignment]
        nsamples: NSamples = None,
        seqlen: SeqLen = None,
        seed: Seed = 0,
        bos: Bos = "auto",
        batch_size: BatchSize = 8,
        device: Device = "auto",
        dtype: Dtype = "auto",
        force: Force = False,
        json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        _run("prune", model=model, output=output, method=method, uniform=uniform, from_profile=from_profile,
             allocation=allocation, target_sparsity=target_sparsity, outlier_m=outlier_m, lam=lam, balance=balance,
             clamp=clamp, wanda_group=wanda_group, wanda_variant=wanda_variant, blocksize=blocksize,
             percdamp=percdamp, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
             batch_size=batch_size, device=device, dtype=dtype, force=force, json_out=json_out, quiet=quiet)

    @app.command("nm", help=NM_HELP)
    @console.handle_errors
    def nm_cmd(
        model: Annotated[str, typer.Argument(help="HF hub id, local model directory, or a built-in model "
                                                  "(builtin:smollm2-135m, builtin:gemma3-270m).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
        pattern: Annotated[Optional[str], typer.Option(
            "--pattern", help="N:M, N weights KEPT per M (2:4 = 50%; the reference's '5:8' is 3:8).")] = None,
        method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt")] = "wanda",
        from_profile: Annotated[Optional[Path], typer.Option("--from-profile", help="Mixed N:M from a profile.")]
        = None,
        allocation: Annotated[Optional[Path], typer.Option("--allocation", help="Mixed N:M allocation JSON.")]
        = None,
        outlier_m: OutlierM = None,
        lam: Lambda = None,
        special: Annotated[bool, typer.Option("--special", help="Reference parity: a step of +1 becomes +2.")]
        = False,
        calib: Calib = None,  # type: ignore[assignment]
        nsamples: NSamples = None,
        seqlen: SeqLen = None,
        seed: Seed = 0,
        bos: Bos = "auto",
        batch_size: BatchSize = 8,
        device: Device = "auto",
        dtype: Dtype = "auto",
        force: Force = False,
        json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        uniform = from_profile is None and allocation is None
        _run("nm", model=model, output=output, method=method, uniform=uniform, from_profile=from_profile,
             allocation=allocation, pattern=pattern, outlier_m=outlier_m, lam=lam, special=special, calib=calib,
             nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos, batch_size=batch_size, device=device, dtype=dtype,
             force=force, json_out=json_out, quiet=quiet)
