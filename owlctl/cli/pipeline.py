"""`owlctl pipeline`: profile -> allocate -> prune (uniform and OWL) -> eval, in one command."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Run the whole OWL comparison on one model: dense vs uniform vs OWL perplexity.

Loads the model once, profiles its outlier distribution (one dense pass), allocates per-block sparsity with
OWL and uniformly, prunes a fresh copy of the weights both ways with the same method, and evaluates all
three on identical held-out windows. On the built-in model the defaults suit a small CPU (16 x 256
calibration tokens, the first 16 windows of 512 tokens of the builtin:wiki test split); other models get
the reference protocol (128 x 2048 tokens of C4, WikiText-2 at 2048). The output says how to run the
full-size protocol.

\b
Examples:
  owlctl pipeline
  owlctl pipeline builtin:smollm2-135m --method sparsegpt -s 0.6 -o runs/sgpt60 --save-checkpoints
  owlctl pipeline meta-llama/Llama-2-7b-hf --calib c4 --nsamples 128 --seqlen 2048 --eval-data wikitext2 --device cuda
"""


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.pipeline import pipeline

    doc = pipeline(cfg, progress=console.Progress(), log=console.log)
    if json_out:
        console.print_json(doc)
        return
    render(doc)


def register(app: typer.Typer) -> None:
    from owlctl.ops.pipeline import PipelineConfig

    command(app, "pipeline", PipelineConfig, _body, help=HELP)


def render(doc: dict) -> None:
    from rich.table import Table

    ev = doc["evaluation"]
    t = Table(title=f"{doc['model']['id']}: {doc['method']} at {doc['target_sparsity']:.0%}, "
                    f"OWL M={doc['outlier_m']:g} lambda={doc['lambda']:g}", title_justify="left")
    t.add_column("variant")
    for d in ev["data"]:
        t.add_column(f"ppl {d} ({ev['split']}, {ev['seqlen']})", justify="right")
    t.add_column("sparsity", justify="right")
    t.add_column("block range", justify="right")
    t.add_column("prune s", justify="right")
    for r in doc["results"]:
        t.add_row(r["variant"], *[_ppl(r["perplexity"][d]["ppl"]) for d in ev["data"]], f"{r['realised_sparsity']:.3f}",
                  f"{r['block_sparsity_min']:.3f}-{r['block_sparsity_max']:.3f}", f"{r['prune_seconds']:.1f}")
    console.out.print(t)
    res = {r["variant"].split()[-1]: r for r in doc["results"]}
    for d in ev["data"]:
        u, o = res["uniform"]["perplexity"][d]["ppl"], res["owl"]["perplexity"][d]["ppl"]
        if u is not None and o is not None:
            console.out.print(f"OWL vs uniform on {d}: {o:.2f} vs {u:.2f} ({(o - u) / u:+.1%})", highlight=False)
    c = doc["calibration"]
    windows = {d: p["windows"] for d, p in res["owl"]["perplexity"].items()}
    console.out.print(f"calibration {c['source']} {c['nsamples']} x {c['seqlen']}; windows {windows}; "
                      f"bos {ev.get('bos', 'never')}; total {doc['seconds']['total']:.0f} s", highlight=False)
    console.out.print(doc["full_size_hint"], highlight=False)


def _ppl(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}"
