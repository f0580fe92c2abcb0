"""`owlctl finetune`."""

from __future__ import annotations

from typing import Optional

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """LoRA-finetune a pruned checkpoint and save it with every pruned weight still zero.

The reference recipe by default (LoRA r 8, alpha 16, dropout 0.05 on q_proj and v_proj; AdamW lr 1e-4, 5 warmup
updates then linear decay; blocks of 1024 tokens, 128 sequences per update = --batch-size x processes x
accumulation). --keep-sparsity merge-mask trains a plain adapter, merges it and re-applies the checkpoint's zero
mask (reporting how much of the update the mask removed); masked-lora trains the update already multiplied by
the mask, so the merged model is exactly the trained one. --adapter-only saves the unmerged peft adapter.
Eval loss and perplexity are measured before and after on the data's validation split. Multi-GPU and
multi-node: run it under `accelerate launch -m owlctl finetune ...`.
This command loads the whole model into memory (there is no --offload here; profile, prune, nm, eval and
pipeline stream models larger than memory).

\b
Examples:
  owlctl finetune wanda50 -o wanda50-ft --steps 20 --batch-size 2 --block-size 256
  owlctl finetune owl70 -o owl70-ft --keep-sparsity masked-lora --targets all-linear --data c4 --epochs 1
  accelerate launch -m owlctl finetune owl70 -o owl70-ft --batch-size 4 --json > ft.json
"""


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def render_summary(res: dict) -> None:
    from rich.table import Table

    tr, ev = res["training"], res["eval"]
    t = Table(title=f"finetune / {res['mode']} / LoRA r {res['lora']['r']} on {', '.join(res['lora']['targets'])}",
              title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")

    def ev_line(e: Optional[dict]) -> str:
        return "-" if not e else f"loss {_fmt(e['loss'])}  ppl {_fmt(e['perplexity'], '.2f')}  acc {_fmt(e['accuracy'])}"

    curve = tr["loss_curve"]
    picks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
    rows = [
        ("checkpoint", res["checkpoint"]),
        ("data", f"{res['data']['train']} -> {res['data']['train_windows']} windows of {tr['block_size']}"),
        ("updates", f"{tr['steps']} x {tr['effective_batch']} sequences ({tr['micro_batch']} x {tr['processes']} "
                    f"process(es) x {tr['grad_accum']} accumulation)"),
        ("trainable", f"{res['lora']['trainable_params']:,} of {res['lora']['model_params']:,} parameters"),
        ("eval before", ev_line(ev.get("before"))),
    ]
    if "after_unmasked" in ev:
        rows.append(("eval after (adapter)", ev_line(ev["after_unmasked"])))
    rows.append(("eval after (saved)", ev_line(ev.get("after"))))
    rows.append(("train loss", "  ".join(f"{curve[i][0]}: {curve[i][1]:.4f}" for i in picks)))
    if res["delta_removed"] is not None:
        d = res["delta_removed"]
        per = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.3f}" for k, v in d["by_target"].items())
        rows.append(("delta removed by mask", f"{d['overall']:.4f} ({per})"))
    sp = res["sparsity"]
    rows.append(("sparsity (prunable)", f"{sp['before']:.4f} -> {sp['after']:.4f}"
                 + ("" if sp["zeros_kept"] else "  (zeros lost!)")))
    rows.append(("throughput", f"{_fmt(tr['tokens_per_s'], ',.0f')} tokens/s ({tr['tokens']:,} tokens)"))
    rows.append(("time", f"{res['seconds']['total']:.1f} s (train {res['seconds']['train']:.1f} s)"))
    rows.append(("output", res["output"]))
    for k, v in rows:
        t.add_row(k, v)
    console.out.print(t)


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.finetune import finetune

    res = finetune(cfg, progress=console.Progress())  # its warnings are OwlctlWarnings (shown by the CLI)
    if not res["process"]["main"]:  # other accelerate processes: the main one reports
        return
    if json_out:
        console.print_json(res)
    else:
        render_summary(res)


def register(app: typer.Typer) -> None:
    from owlctl.ops.finetune import FinetuneConfig

    command(app, "finetune", FinetuneConfig, _body, help=HELP)
