"""`owlctl pipeline`: profile -> allocate -> prune (uniform and OWL) -> eval, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from owlctl.cli import console
from owlctl.cli.options import BatchSize, Bos, Calib, Device, Dtype, Force, Json, NSamples, Quiet, SeqLen, Seed

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


def register(app: typer.Typer) -> None:
    @app.command("pipeline", help=HELP)
    @console.handle_errors
    def pipeline_cmd(
        model: Annotated[str, typer.Argument(help="HF hub id, local model directory, or a built-in model "
                                                  "(builtin:smollm2-135m, builtin:gemma3-270m).")]
        = "builtin:smollm2-135m",
        method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt")] = "wanda",
        target_sparsity: Annotated[float, typer.Option("--target-sparsity", "-s", help="Fraction pruned.")] = 0.7,
        outlier_m: Annotated[float, typer.Option("--outlier-m", "-m", help="Outlier threshold M.")] = 5.0,
        lam: Annotated[float, typer.Option("--lambda", "-l", help="OWL range lambda.")] = 0.08,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for profile, allocations, results.")]
        = None,
        save_checkpoints: Annotated[bool, typer.Option("--save-checkpoints", help="Also save both pruned models.")]
        = False,
        eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="builtin:wiki | wikitext2 | c4 | FILE")]
        = None,
        eval_split: Annotated[str, typer.Option("--eval-split", help="test | validation")] = "test",
        eval_seqlen: Annotated[Optional[int], typer.Option("--eval-seqlen", help="Evaluation window length.")] = None,
        max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate at most N windows.")]
        = None,
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
        console.set_quiet(quiet)
        from owlctl.ops.pipeline import PipelineConfig, pipeline

        cfg = PipelineConfig(model=model, method=method, target_sparsity=target_sparsity, outlier_m=outlier_m,
                             lam=lam, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
                             batch_size=batch_size, eval_data=eval_data, eval_split=eval_split,
                             eval_seqlen=eval_seqlen, max_windows=max_windows, output=output,
                             save_checkpoints=save_checkpoints, device=device, dtype=dtype, force=force)
        doc = pipeline(cfg, progress=console.Progress(), log=console.log)
        if json_out:
            console.print_json(doc)
            return
        render(doc)


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
        t.add_row(r["variant"], *[f"{r['perplexity'][d]:.2f}" for d in ev["data"]], f"{r['realised_sparsity']:.3f}",
                  f"{r['block_sparsity_min']:.3f}-{r['block_sparsity_max']:.3f}", f"{r['prune_seconds']:.1f}")
    console.out.print(t)
    res = {r["variant"].split()[-1]: r for r in doc["results"]}
    for d in ev["data"]:
        u, o = res["uniform"]["perplexity"][d], res["owl"]["perplexity"][d]
        console.out.print(f"OWL vs uniform on {d}: {o:.2f} vs {u:.2f} ({(o - u) / u:+.1%})", highlight=False)
    c = doc["calibration"]
    console.out.print(f"calibration {c['source']} {c['nsamples']} x {c['seqlen']}; windows "
                      f"{res['owl']['windows']}; bos {ev.get('bos', 'never')}; total {doc['seconds']['total']:.0f} s",
                      highlight=False)
    console.out.print(doc["full_size_hint"], highlight=False)
