"""`owlctl export`: an ONNX graph (onnxruntime, DeepSparse) or a packed sparse directory."""

from __future__ import annotations

import typer

from owlctl.cli import console
from owlctl.cli.declare import command

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
This command loads the whole model into memory (there is no --offload here; profile, prune, nm, eval and
pipeline stream models larger than memory).

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
    rows = [("model", doc["model"]["id"]), ("output", doc.get("output") or "")]
    if doc["format"] == "onnx":
        o = doc["onnx"]
        g = o["graph"]
        rows += [("graph", f"{g['file']}: opset {g['opset']}, IR {g['ir_version']}, "
                           f"{'KV cache' if g['kv_cache'] else 'no KV cache'}, {len(g['inputs'])} inputs")]
        v = o.get("verification")
        if v:
            rows.append(("onnxruntime vs PyTorch", f"max |diff| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:g})"))
        rows.append(("size", f"{o['onnx_bytes'] / mb:.1f} MiB ONNX"
                     + (f" vs {doc['dense_safetensors_bytes'] / mb:.1f} MiB safetensors"
                        if doc.get("dense_safetensors_bytes") else "")))
    else:
        k = doc["packed"]
        rows += [("packed weights", f"{k['packed_tensors']} matrices at {k['realised_sparsity']:.1%} sparsity"),
                 ("size", f"{k['packed_bytes'] / mb:.1f} MiB packed vs {k['dense_bytes'] / mb:.1f} MiB dense "
                          f"({k['size_ratio']:.3f})")]
    rows.append(("time", f"{doc['seconds']['total']:.1f} s"))
    for k, v in rows:
        t.add_row(k, str(v))
    console.out.print(t)


def _body(cfg, json_out: bool, quiet: bool) -> None:
    from owlctl.ops.export import export

    console.log(f"exporting {cfg.checkpoint} as {cfg.format} to {cfg.output}")
    doc = export(cfg, progress=console.Progress())
    if json_out:
        console.print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    from owlctl.ops.export import ExportConfig

    command(app, "export", ExportConfig, _body, help=HELP)
