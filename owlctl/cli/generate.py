"""`owlctl generate`: stream a model's text to stdout, on PyTorch's dense kernels or owlctl's sparse ones."""

from __future__ import annotations

import sys

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

HELP = """Generate text with a (pruned) model on the CPU, streamed to stdout as it is produced.

The prompt is wrapped in the tokenizer's chat template when it has one (--raw feeds it as it is), prefilled
once, then decoded one token per step through the KV cache: greedy by default, sampled with --temperature
(and --top-p, --seed). --backend torch-sparse runs the prunable Linears on owlctl's sparse CPU kernels
(nonzeros + bitmask, --threads threads), as `owlctl bench --backend torch-sparse` measures them; without
a C compiler it falls back to torch's CSR kernels and says so. Only the generated text goes to stdout;
loading messages and the timing summary go to stderr (-q: none). --json prints one document instead: the
text, the token ids, and the timings (prefill seconds, decode tokens/s, backend, threads).

\b
Examples:
  owlctl generate wanda70 --prompt "Write a haiku about owls" --backend torch-sparse
  owlctl generate builtin:smollm2-135m -p "The capital of France is" --raw -n 20
  owlctl generate wanda70 -p "Hello" --backend torch-sparse --threads 2 --json | jq .timings
"""


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.generate import generate

    streamed: list[str] = []

    def on_text(piece: str) -> None:
        streamed.append(piece)
        if not json_out:
            _write(piece)

    try:
        doc = generate(cfg, on_text=on_text, log=console.warn)
    finally:
        if streamed and not json_out:
            _write("\n")  # end the streamed text's line, also when interrupted
    if json_out:
        console.print_json(doc)
        return
    t = doc["timings"]
    rate = t["decode_tokens_per_s"]
    console.log(f"{doc['generated_tokens']} tokens ({doc['stop']}); prefill {t['prefill_tokens']} tokens in "
                f"{t['prefill_s']:.2f} s, decode {'-' if rate is None else f'{rate:.2f}'} tok/s; "
                f"{doc['backend']}{' (' + doc['kernel'] + ')' if doc['kernel'] else ''}, "
                f"{doc['threads']} thread(s)")


def register(app: typer.Typer) -> None:
    from owlctl.ops.generate import GenerateConfig

    command(app, "generate", GenerateConfig, _body, help=HELP)
