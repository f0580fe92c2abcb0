"""`owlctl export`: an ONNX graph (onnxruntime, DeepSparse) or a packed sparse directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from owlctl.cli import console
from owlctl.cli.options import Dtype, Force, Json, Quiet

HELP = """Export a checkpoint as an ONNX graph or as a packed sparse directory.

--format onnx writes model.onnx (opset 17, IR 8, torch's TorchScript exporter) plus config and tokenizer.
With --kv-cache (the default) the graph takes input_ids, attention_mask (past + new positions) and
past_key_values.{i}.key/value, and returns logits and present.{i}.key/value, so one graph serves the prompt
(past length 0) and every decode step; --no-kv-cache writes input_ids + attention_mask -> logits. Position
ids come from the attention mask inside the graph. The graph is run in onnxruntime and its outputs compared
with PyTorch before anything is published (error above --tolerance). This replaces the reference's
`sparseml.export`, which cannot run on this stack (docs/export.md).

--format packed stores each prunable weight as its nonzero values plus a bitmask (1 bit per weight), all
other tensors dense, in one safetensors file with a JSON header (owlctl.packed/1). owlctl loads it back
bit-exactly; `owlctl eval` and `owlctl bench` accept the directory as MODEL.

\b
Examples:
  owlctl export wanda70 --format onnx -o wanda70-onnx
  owlctl export wanda70 --format onnx --no-kv-cache -o wanda70-onnx-nokv
  owlctl export wanda70 --format packed -o wanda70-packed --json | jq .size_ratio
"""


def render(doc: dict) -> None:
    from rich.table import Table

    t = Table(title=f"export {doc['format']}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    mb = 2**20
    rows = [("source", doc["source"]["id"]), ("output", doc.get("output", ""))]
    if doc["format"] == "onnx":
        g = doc["graph"]
        rows += [("graph", f"{g['file']}: opset {g['opset']}, IR {g['ir_version']}, "
                           f"{'KV cache' if g['kv_cache'] else 'no KV cache'}, {len(g['inputs'])} inputs")]
        v = doc.get("verification")
        if v:
            rows.append(("onnxruntime vs PyTorch", f"max |diff| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:g})"))
        rows.append(("size", f"{doc['onnx_bytes'] / mb:.1f} MiB ONNX"
                     + (f" vs {doc['dense_safetensors_bytes'] / mb:.1f} MiB safetensors"
                        if doc.get("dense_safetensors_bytes") else "")))
    else:
        rows += [("packed weights", f"{doc['packed_tensors']} matrices at {doc['packed_sparsity']:.1%} sparsity"),
                 ("size", f"{doc['packed_bytes'] / mb:.1f} MiB packed vs {doc['dense_bytes'] / mb:.1f} MiB dense "
                          f"({doc['size_ratio']:.3f})")]
    rows.append(("time", f"{doc['seconds']['total']:.1f} s"))
    for k, v in rows:
        t.add_row(k, str(v))
    console.out.print(t)


def register(app: typer.Typer) -> None:
    @app.command("export", help=HELP)
    @console.handle_errors
    def export_cmd(
        checkpoint: Annotated[str, typer.Argument(
            help="Checkpoint directory, packed directory, HF hub id, or builtin:smollm2-135m.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")],
        fmt: Annotated[str, typer.Option("--format", help="onnx | packed")] = "onnx",
        kv_cache: Annotated[bool, typer.Option(
            "--kv-cache/--no-kv-cache", help="onnx: past key/values in, present out (for decoding).")] = True,
        tolerance: Annotated[float, typer.Option(
            "--tolerance", help="onnx: largest allowed |onnxruntime - PyTorch| on the checked outputs.")] = 1e-3,
        no_verify: Annotated[bool, typer.Option("--no-verify", help="onnx: skip the onnxruntime check.")] = False,
        threads: Annotated[int, typer.Option("--threads", help="CPU threads for tracing and the check.")] = 1,
        dtype: Dtype = "auto",
        force: Force = False,
        json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        console.set_quiet(quiet)
        from owlctl.ops.export import ExportConfig, export

        cfg = ExportConfig(checkpoint=checkpoint, output=output, format=fmt, kv_cache=kv_cache, tolerance=tolerance,
                           verify=not no_verify, threads=threads, dtype=dtype, force=force)
        console.log(f"exporting {checkpoint} as {fmt} to {output}")
        doc = export(cfg, progress=console.Progress())
        if json_out:
            console.print_json(doc)
        else:
            render(doc)
