"""`owlctl search`: parse -> SearchConfig -> owlctl.ops.search -> table or JSON."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Search per-block sparsities (or per-block N of mixed N:M) that beat OWL's rule on held-out text.

Builds a database of every block pruned at a grid of levels around the target (on disk, --db), starts
from uniform and OWL at every (M, lambda) of a grid, and evolves the allocation (one block a level up,
another a level down: the mean stays exactly the target) to lower the KL divergence between the dense and
the pruned model's next-token distributions on validation windows (never the test split). The winner's
objective is never above uniform's or any OWL seed's. Writes an ordinary allocation file for
`prune --allocation` / `nm --allocation`. --mode owl-grid only picks the best (M, lambda) of the grid, or uniform (cheap). An
interrupted search resumes from its database: run the same command again.

\b
Examples:
  owlctl search builtin:smollm2-135m --method wanda -s 0.7 --budget 20m -o search70.json
  owlctl prune builtin:smollm2-135m --method wanda --allocation search70.json -o wanda-search70
  owlctl search builtin:smollm2-135m --method wanda --pattern 3:8 --budget 300 -o mixed38.json
  owlctl search builtin:smollm2-135m --method sparsegpt -s 0.7 --mode owl-grid -o owl-tuned.json
"""


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from rich.markup import escape

    from owlctl.ops.search import search

    doc = search(cfg, progress=console.Progress())
    if cfg.output is not None:
        console.log(f"wrote {escape(str(cfg.output))}")
    if json_out:
        console.print_json(doc)
    else:
        render(doc)


def render(doc: dict) -> None:
    from rich.table import Table

    s = doc["params"]["search"]
    t = Table(title=f"search ({s['mode']}, {s['method']}): objective {s['objective']} on "
              f"{s['objective_data']['windows']} x {s['objective_data']['seqlen']} tokens of "
              f"{s['objective_data']['source']} ({s['objective_data']['split']})", title_justify="left")
    t.add_column("candidate")
    t.add_column("objective", justify="right")
    t.add_column("vs uniform", justify="right")
    rows = sorted(s["seeds"], key=lambda r: r["objective"])[:6]
    for r in rows:
        t.add_row(r["name"], f"{r['objective']:.6f}", f"{r['objective'] / s['uniform_objective']:.3f}")
    t.add_row("[bold]winner[/bold]", f"{s['winner_objective']:.6f}",
              f"{s['winner_objective'] / s['uniform_objective']:.3f}")
    if s["verified"]:
        v = s["verified"]
        t.add_row("winner, real prune", f"{v['objective']:.6f}", f"{v['objective'] / v['uniform_objective']:.3f}")
    console.out.print(t)
    values = [b["n_keep"] if b["n_keep"] is not None else b["sparsity"] for b in doc["blocks"]]
    shown = " ".join(f"{v:g}" if isinstance(v, int) else f"{v:.3f}" for v in values)
    console.out.print(f"chosen: {s['chosen']}; per block: {shown}", highlight=False)
    console.out.print(f"{s['evaluations']} children in {s['generations']} generations ({s['improvements']} "
                      f"improvements), {doc['seconds'].get('total', 0):.0f} s; database {s['database']}",
                      highlight=False)


def register(app: typer.Typer) -> None:
    from owlctl.ops.search import SearchConfig

    command(app, "search", SearchConfig, _body, help=HELP, no_args_is_help=True)
