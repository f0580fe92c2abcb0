"""`owlctl eval`: perplexity (reference protocol), sparsity audit, optional zero-shot accuracy."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Measure a model's perplexity, audit its sparsity, and optionally run zero-shot tasks.

Perplexity follows the OWL/Wanda reference: the split's text is tokenised once and cut into
floor(n / seqlen) non-overlapping windows (the remainder is dropped); each window's mean cross-entropy
(float32) over its seqlen-1 next-token predictions is averaged over windows, and ppl = exp(that mean).
--bos always gives every window its own BOS ([BOS] + seqlen-1 tokens); the default auto does so when the
tokenizer adds a BOS to every sequence (Gemma), --bos never is the reference exactly. Text that overlaps
the calibration text the checkpoint records is refused. The audit counts the exact zeros of every
prunable Linear, apart from the zeros the weights had before pruning, and checks them against the
allocation the checkpoint records. Zero-shot tasks (--tasks / --zeroshot) run through the stock lm-eval harness
(pip install 'owlctl[eval]'); its accuracies are not comparable with the paper's length-normalised
pipeline. Data defaults to builtin:wiki at seqlen 512 for the built-in model and checkpoints pruned from
it, wikitext2 at 2048 otherwise; the test split is used unless --split validation.

\b
Examples:
  owlctl eval wanda70 --max-windows 32
  owlctl eval owl70 --compare wanda70 --json | jq .comparison.ratio
  owlctl eval meta-llama/Llama-2-7b-hf --data wikitext2 --data c4 --zeroshot --device cuda
"""


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.evaluate import evaluate

    console.log(f"evaluating {cfg.model}" + (f" against {cfg.compare}" if cfg.compare else ""))
    # No bars (-q, or stderr is not a terminal): progress None also mutes lm-eval's own bars.
    doc = evaluate(cfg, progress=console.Progress())
    if json_out:
        console.print_json(doc)
        return
    render(doc)


def register(app: typer.Typer) -> None:
    from owlctl.ops.evaluate import EvalConfig

    command(app, "eval", EvalConfig, _body, help=HELP)


def _name(model: dict) -> str:
    """What the user typed, and the model a checkpoint was pruned from when that differs."""
    spec, origin = model.get("spec") or model["id"], model["id"]
    return spec if origin == spec else f"{spec} (from {origin})"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(doc: dict) -> None:
    from rich.table import Table

    out = console.out
    cmp = doc.get("comparison")
    if doc["perplexity"]:
        t = Table(title=f"perplexity: {_name(doc['model'])}", title_justify="left")
        for col in ("data", "split", "bos", "seqlen", "windows", "tokens", "ppl"):
            t.add_column(col, justify="left" if col in ("data", "split", "bos") else "right")
        if cmp:
            t.add_column("ppl other", justify="right")
            t.add_column("other/this", justify="right")
        for source, r in doc["perplexity"].items():
            row = [source, r["split"], r.get("bos", "never"), str(r["seqlen"]), str(r["windows"]), str(r["tokens"]),
                   _fmt(r["ppl"])]
            if cmp:
                row += [_fmt(cmp["perplexity"][source]["ppl"]), _fmt(cmp["ratio"][source], ".4f")]
            t.add_row(*row)
        out.print(t)
        if cmp:
            same = "identical" if cmp["identical_windows"] else "[red]DIFFERENT[/red]"
            out.print(f"other = {_name(cmp['model'])}, scored on {same} token windows", highlight=False)
    _render_audit(doc["audit"], _name(doc["model"]))
    if cmp:
        _render_audit(cmp["audit"], _name(cmp["model"]))
    for d in [doc] + ([cmp] if cmp else []):
        if d.get("zeroshot"):
            _render_zeroshot(d["zeroshot"], _name(d["model"]))
    out.print(f"time: {doc['seconds']['total']:.1f} s", highlight=False)


def _render_audit(a: dict, name: str) -> None:
    from rich.table import Table

    out = console.out
    status = {"ok": ": [green]ok[/green]", "mismatch": ": [red]MISMATCH[/red]"}.get(a["status"], "")
    pat = a["pattern"]
    pattern = "" if pat is None else (" unstructured" if pat["kind"] == "unstructured"
                                      else f" {pat['n_keep']}:{pat['m']} (kept:group)")
    what = f"{a['allocator']} allocation{pattern}" if a["allocator"] else "no allocation recorded"
    t = Table(title=f"sparsity audit: {name} ({what}){status}", title_justify="left")
    for col in ("block", "allocated", "pruned", "pre-existing", "realised", "diff", "check"):
        t.add_column(col, justify="left" if col == "check" else "right")
    for b in a["blocks"]:
        diff = None if b["allocated_sparsity"] is None else b["realised_sparsity"] - b["allocated_sparsity"]
        ok = "" if b["ok"] is None else ("ok" if b["ok"] else "[red]MISMATCH[/red]")
        t.add_row(str(b["index"]), _fmt(b["allocated_sparsity"], ".4f"), _fmt(b.get("pruned_sparsity"), ".4f"),
                  _fmt(b.get("preexisting_sparsity"), ".4f"), f"{b['realised_sparsity']:.4f}", _fmt(diff, "+.4f"), ok)
    out.print(t)
    line = f"realised {a['realised_sparsity']:.4f} of {a['numel']} prunable weights (all exact zeros)"
    if a.get("preexisting_sparsity") is not None:
        line += (f"; zero before pruning {a['preexisting_sparsity']:.4f}, "
                 f"pruned by the masks {_fmt(a.get('pruned_sparsity'), '.4f')}")
    if a["allocated_sparsity"] is not None:
        line += f"; allocated {a['allocated_sparsity']:.4f}"
    out.print(line, highlight=False)
    for m in a["mismatches"]:
        where = m["name"] or "model"
        if m.get("linear"):
            where += f".{m['linear']}"
        out.print(f"[red]mismatch[/red] {where}: {m['reason']}", highlight=False)


def _render_zeroshot(z: dict, name: str) -> None:
    from rich.table import Table

    t = Table(title=f"zero-shot (lm-eval {z['lm_eval_version']}, 0-shot): {name}", title_justify="left")
    for col in ("task", "acc", "acc_norm", "examples"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for task, r in z["tasks"].items():
        t.add_row(task, _fmt(r.get("acc"), ".4f"), _fmt(r.get("acc_norm"), ".4f"), str(r.get("samples") or "-"))
    t.add_row("mean", _fmt(z["mean_acc"], ".4f"), "", "")
    console.out.print(t)
    console.out.print("stock harness scoring: not comparable with the OWL paper's length-normalised numbers",
                      highlight=False)
