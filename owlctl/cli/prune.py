"""`owlctl prune` and `owlctl nm`."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

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


def _body(kind: str):
    def body(cfg, json_out: bool, quiet: bool) -> None:
        from owlctl.ops import prune as prune_ops

        res = getattr(prune_ops, kind)(cfg, progress=console.Progress())
        if json_out:
            console.print_json(res)
        else:
            render_summary(res)
    return body


def render_summary(res: dict) -> None:
    from rich.table import Table

    pat = res["pattern"]
    pattern = "unstructured" if pat["kind"] == "unstructured" else f"{pat['n_keep']}:{pat['m']} (kept:group)"
    t = Table(title=f"{res['method']} / {res['allocator']} / {pattern}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("model", res["model"]["id"]),
        ("target sparsity", "-" if res["target_sparsity"] is None else f"{res['target_sparsity']:.4f}"),
        ("allocated (param-weighted)", f"{res['allocated_sparsity']:.4f}"),
        ("realised (all exact zeros)", f"{res['realised_sparsity']:.4f}"),
        ("pruned by the masks", f"{res['pruned_sparsity']:.4f}"),
        ("zero before pruning", f"{res['preexisting_sparsity']:.4f}"),
        ("block sparsity range", f"{min(b['realised_sparsity'] for b in res['blocks']):.3f} .. "
                                 f"{max(b['realised_sparsity'] for b in res['blocks']):.3f}"),
        ("masks differing from allocation", str(res["mask_mismatches"])),
        ("calibration", "-" if not res.get("calibration") else
         f"{res['calibration']['source']}, {res['calibration']['nsamples']} x {res['calibration']['seqlen']} "
         f"tokens, bos {res['calibration'].get('bos', 'never')}"),
        ("time", f"{res['seconds']['total']:.1f} s"),
        ("peak memory (RSS)", f"{res['peak_rss_mb']:.0f} MiB (model {res['model_mb']:.0f} MiB)"),
        ("checkpoint", res["output"] or "(not saved)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.out.print(t)


def register(app: typer.Typer) -> None:
    from owlctl.ops.prune import NM_ONLY, PRUNE_ONLY, PruneConfig

    command(app, "prune", PruneConfig, _body("prune"), help=PRUNE_HELP, exclude=NM_ONLY)
    command(app, "nm", PruneConfig, _body("nm"), help=NM_HELP, exclude=PRUNE_ONLY)
