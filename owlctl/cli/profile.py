"""`owlctl profile`: one dense calibration pass -> outlier profile JSON."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Measure each decoder block's outlier ratio on calibration data (one dense pass).

For every block and every prunable Linear, owlctl computes the Wanda score |W_ij| * ||X_j|| on calibration
data and counts the scores above M x the block mean, for several M at once, so `owlctl allocate` can sweep M
and lambda in milliseconds without the model. Writes an owlctl.profile/1 JSON file.

\b
Examples:
  owlctl profile builtin:smollm2-135m -o profile.json
  owlctl profile meta-llama/Llama-2-7b-hf --calib c4 --nsamples 128 --seqlen 2048 --device cuda -o llama2.json
  owlctl profile ./my-model --calib corpus.txt --outlier-m 3,5,7 -o p.json --json | jq .seconds
"""


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.profile import profile

    if cfg.output is None:
        console.warn("no -o given: the profile is only printed, not saved")
    res = profile(cfg, progress=console.Progress())
    if json_out:
        console.print_json(res)
        return
    _render(res)


def register(app: typer.Typer) -> None:
    from owlctl.ops.profile import ProfileConfig

    command(app, "profile", ProfileConfig, _body, help=HELP)


def _render(res: dict) -> None:
    from rich.table import Table

    doc = res
    ms = [f"{m:g}" for m in doc["outlier_m"]]
    show = [k for k in ms if k in ("3", "5", "7", "10")] or ms[:4]
    t = Table(title=f"outlier ratio (%) per block: {doc['model']['id']}", title_justify="left")
    t.add_column("block", justify="right")
    for k in show:
        t.add_column(f"M={k}", justify="right")
    for b in doc["blocks"]:
        t.add_row(str(b["index"]), *[f"{b['outlier_pct'][k]:.3f}" for k in show])
    console.out.print(t)
    c = doc["calibration"]
    console.out.print(f"calibration: {c['source']}, {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}, "
                      f"bos {c.get('bos', 'never')}; "
                      f"{res['seconds']['total']:.1f} s; saved to {res['output'] or '(not saved)'}", highlight=False)
