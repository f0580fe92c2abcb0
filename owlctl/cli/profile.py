"""`owlctl profile`: one dense calibration pass -> outlier profile JSON."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from owlctl.cli import console
from owlctl.cli.options import BatchSize, Bos, Calib, Device, Dtype, Force, Json, NSamples, Quiet, SeqLen, Seed

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


def _parse_ms(text: str) -> tuple[float, ...]:
    from owlctl.errors import InputError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--outlier-m takes comma-separated numbers, got {text!r}", hint="e.g. 3,4,5,6") from None


def register(app: typer.Typer) -> None:
    @app.command("profile", help=HELP)
    @console.handle_errors
    def profile_cmd(
        model: Annotated[str, typer.Argument(help="HF hub id, local model directory, or a built-in model "
                                                  "(builtin:smollm2-135m, builtin:gemma3-270m).")],
        output: Annotated[Optional[str], typer.Option("--output", "-o", help="Profile JSON to write.")] = None,
        outlier_m: Annotated[str, typer.Option("--outlier-m", "-m", help="Comma-separated M values to count.")]
        = "3,4,5,6,7,8,9,10",
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
        from pathlib import Path

        console.set_quiet(quiet)
        from owlctl.ops.profile import ProfileConfig, profile

        if output is None:
            console.warn("no -o given: the profile is only printed, not saved")
        cfg = ProfileConfig(model=model, output=Path(output) if output else None, outlier_m=_parse_ms(outlier_m),
                            calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
                            batch_size=batch_size, device=device, dtype=dtype, force=force)
        res = profile(cfg, progress=console.Progress())
        if json_out:
            console.print_json(res)
            return
        _render(res)


def _render(res: dict) -> None:
    from rich.table import Table

    doc = res["profile"]
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
