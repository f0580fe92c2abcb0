"""`owlctl allocate`: parse -> AllocateConfig -> owlctl.ops.allocate -> table or JSON. No torch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from owlctl.cli import console
from owlctl.cli.options import Force, Json, Lambda, OutlierM, Output, Pattern, Quiet, TargetSparsity


class Allocator(str, Enum):
    owl = "owl"
    uniform = "uniform"


class Balance(str, Enum):
    blocks = "blocks"
    params = "params"


class Clamp(str, Enum):
    redistribute = "redistribute"
    reference = "reference"
    none = "none"


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
  owlctl allocate profile.json -s 0.7 -m 5 -l 0.08 --plot owl.png --json | jq .achieved
  owlctl allocate profile.json --pattern 3:8 -m 6 -l 2 -o nm.json
"""


ProfileArg = Annotated[Path, typer.Argument(
    help="profile.json written by `owlctl profile`.", metavar="PROFILE", show_default=False)]
AllocatorOpt = Annotated[Allocator, typer.Option("--allocator", help="owl, or uniform (S in every block).")]
SpecialOpt = Annotated[bool, typer.Option(
    "--special", help="Mixed N:M only: a +1 step becomes +2 (the reference's wanda_owl_structure_special).")]
BalanceOpt = Annotated[Balance, typer.Option(
    "--balance", help="Keep the mean over blocks (reference) or over parameters.")]
ClampOpt = Annotated[Clamp, typer.Option("--clamp", help=(
    "redistribute: clip to [min, max] and shift the rest so the mean stays S; "
    "reference: s <= 0 -> 0.01; none: error when out of [0, 1)."))]
MinSparsity = Annotated[float, typer.Option("--min-sparsity", help="Lowest block sparsity (redistribute).")]
MaxSparsity = Annotated[float, typer.Option("--max-sparsity", help="Highest block sparsity (redistribute).")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", show_default=False, help=(
    "Also draw outlier ratio and sparsity per block (.png/.pdf/.svg; needs matplotlib)."))]


def allocate_cmd(
    profile: ProfileArg,
    output: Output = None,
    target_sparsity: TargetSparsity = None,
    outlier_m: OutlierM = None,
    lam: Lambda = None,
    allocator: AllocatorOpt = Allocator.owl,
    pattern: Pattern = None,
    special: SpecialOpt = False,
    balance: BalanceOpt = Balance.blocks,
    clamp: ClampOpt = Clamp.redistribute,
    min_sparsity: MinSparsity = 0.0,
    max_sparsity: MaxSparsity = 0.99,
    plot: PlotOpt = None,
    json_out: Json = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    console.set_quiet(quiet)
    from rich.markup import escape

    from owlctl.ops.allocate import AllocateConfig, allocate

    if plot is not None:
        from owlctl.ops.plot import check_plot_path

        check_plot_path(plot, force)
    cfg = AllocateConfig(profile=profile, target_sparsity=target_sparsity, outlier_m=outlier_m, lam=lam,
                         allocator=allocator.value, pattern=pattern, balance=balance.value, clamp=clamp.value,
                         min_sparsity=min_sparsity, max_sparsity=max_sparsity, special=special, output=output,
                         force=force)
    doc = allocate(cfg)
    if output is not None:
        console.log(f"wrote {escape(str(output))}")
    if plot is not None:
        from owlctl.ops.plot import plot_allocation

        plot_allocation(doc, plot, force=force)
        console.log(f"wrote {escape(str(plot))}")
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

    params, pattern, ach = doc["params"], doc["pattern"], doc["achieved"]
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
    line = f"mean sparsity {ach['mean_sparsity']:.4f}, parameter-weighted {ach['param_weighted_sparsity']:.4f}"
    if ach["target_sparsity"] is not None:
        line += f"; target {ach['target_sparsity']:.4f}, drift {ach['drift']:+.4f}"
    console.out.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("allocate", help=HELP, no_args_is_help=True)(console.handle_errors(allocate_cmd))
