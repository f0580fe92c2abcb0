"""`owlctl allocate`: parse -> AllocateConfig -> owlctl.ops.allocate -> table or JSON. No torch."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Turn a profile into one sparsity per decoder block (OWL), in milliseconds, without the model.

Reads the outlier ratio D_l of every block (percent of Wanda scores above M x the block mean, for the
--outlier-m M chosen among those profiled) and gives blocks with more outliers a lower sparsity:
s_l = S - (z_l - mean z), z = D min-max scaled to [0, 2*lambda]; the mean stays S. With --pattern N:M
(N weights KEPT per group of M; the reference's "5:8" is 3:8 here) each block gets its own N instead
(mixed N:M, z scaled to [0, lambda], rounded to whole N steps). Defaults: M 5, lambda 0.08
unstructured; M 6, lambda 2 for N:M.

\b
Examples:
  owlctl allocate profile.json -s 0.7 -o allocation.json
  owlctl allocate profile.json -s 0.7 -m 5 -l 0.08 --plot owl.png --json | jq .allocated_sparsity
  owlctl allocate profile.json --pattern 3:8 -m 6 -l 2 -o nm.json
"""


def allocate_body(cfg, json_out: bool = False, quiet: bool = False) -> None:
    from rich.markup import escape

    from owlctl.ops.allocate import allocate

    if cfg.plot is not None:
        from owlctl.ops.plot import check_plot_path

        check_plot_path(cfg.plot, cfg.force)
    doc = allocate(cfg)
    if cfg.output is not None:
        console.log(f"wrote {escape(str(cfg.output))}")
    if cfg.plot is not None:
        from owlctl.ops.plot import plot_allocation

        plot_allocation(doc, cfg.plot, force=cfg.force)
        console.log(f"wrote {escape(str(cfg.plot))}")
    dense = [b["index"] for b in doc["blocks"] if b["n_keep"] == 0]
    if dense:
        console.warn(f"blocks {dense} keep 0 weights per group (fully pruned); lower --lambda or raise N")
    if json_out:
        console.print_json(doc)
    else:
        render(doc)


def _bar(frac: float, width: int = 16) -> str:
    """A left-aligned terminal bar for a fraction in [0, 1], with eighth-cell resolution."""
    eighths = round(max(0.0, min(1.0, frac)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)


def render(doc: dict) -> None:
    from rich.table import Table

    params, pattern = doc["params"], doc["pattern"]
    nm = pattern["kind"] == "nm"
    if nm:
        title = f"mixed N:M, base {pattern['n_keep']}:{pattern['m']} (N = weights kept)"
    else:
        title = f"{params['allocator']} allocation, target sparsity {params['target_sparsity']:g}"
    if params["allocator"] == "owl":
        title += f", M {params['outlier_m']:g}, lambda {params['lambda']:g}"
    table = Table(title=title, title_justify="left")
    table.add_column("block", justify="right")
    table.add_column("outlier %", justify="right")
    table.add_column("", no_wrap=True)
    if nm:
        table.add_column("N:M", justify="right", no_wrap=True)
    table.add_column("sparsity", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    pcts = [b["outlier_pct"] for b in doc["blocks"] if b["outlier_pct"] is not None]
    top = max(pcts, default=0.0) or 1.0
    for b in doc["blocks"]:
        pct = b["outlier_pct"]
        cells = [str(b["index"]), "-" if pct is None else f"{pct:.3f}",
                 "" if pct is None else f"[cyan]{_bar(pct / top)}[/cyan]"]
        if nm:
            cells.append(f"{b['n_keep']}:{pattern['m']}")
        table.add_row(*cells, f"{b['sparsity']:.4f}", f"[red]{_bar(b['sparsity'])}[/red]")
    console.out.print(table)
    line = f"mean sparsity {doc['mean_block_sparsity']:.4f}, parameter-weighted {doc['allocated_sparsity']:.4f}"
    if doc["target_sparsity"] is not None:
        line += f"; target {doc['target_sparsity']:.4f}, drift {doc['drift']:+.4f}"
    console.out.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    from owlctl.ops.allocate import AllocateConfig

    command(app, "allocate", AllocateConfig, allocate_body, help=HELP, no_args_is_help=True)
