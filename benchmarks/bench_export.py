"""Export sizes and fidelity for the built-in model at 70%: dense safetensors vs packed vs ONNX.

    python benchmarks/bench_export.py --sparse /tmp/w70

Exports the 70% checkpoint as packed and as ONNX (with and without KV cache) into a temporary directory,
checks the packed round trip bit for bit, and writes docs/bench_export.json and docs/bench_export.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from owlctl.deploy.eol.deepsparse_host import cpu_info
    from owlctl.engine.models import cache_dir
    from owlctl.formats import packed
    from owlctl.ops.export import ExportConfig, export

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparse", type=Path, default=cache_dir() / "bench" / "wanda70")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_export")
    args = ap.parse_args()
    if not (args.sparse / "config.json").is_file():
        print(f"{args.sparse} is not a checkpoint; run benchmarks/bench_decode.py first or pass --sparse",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="owlctl-bench-export-"))
    res: dict = {"cpu": cpu_info(), "checkpoint": str(args.sparse), "threads": 1}
    try:
        dense_st = sum(f.stat().st_size for f in args.sparse.glob("*.safetensors"))
        res["dense_safetensors_bytes"] = dense_st

        t = time.perf_counter()
        doc = export(ExportConfig(checkpoint=str(args.sparse), output=work / "packed", format="packed"))
        res["packed"] = {k: doc["packed"][k] for k in ("packed_bytes", "dense_bytes", "size_ratio",
                                                       "realised_sparsity", "packed_tensors")}
        res["packed"]["export_seconds"] = time.perf_counter() - t
        stored = load_file(str(work / "packed" / packed.PACKED_WEIGHTS))
        head = packed.read_header(work / "packed")
        numel = sum(e["numel"] for e in head["tensors"] if e.get("encoding") == "bitmask")
        res["packed"]["prunable_weights_ratio"] = sum(
            t.numel() * t.element_size() for k, t in stored.items() if k.endswith((".values", ".bitmask"))) / (4 * numel)
        t = time.perf_counter()
        model = packed.load_packed(work / "packed")
        res["packed"]["load_seconds"] = time.perf_counter() - t
        original = load_file(str(args.sparse / "model.safetensors"))
        sd = model.state_dict()
        res["packed"]["bit_exact"] = all(torch.equal(v, sd[k]) for k, v in original.items())
        res["packed"]["tensors_checked"] = len(original)
        del model, sd

        for kv in (True, False):
            name = "onnx_kv" if kv else "onnx_no_kv"
            t = time.perf_counter()
            doc = export(ExportConfig(checkpoint=str(args.sparse), output=work / name, format="onnx", kv_cache=kv))
            o = doc["onnx"]
            res[name] = {"onnx_bytes": o["onnx_bytes"], "wall_seconds": time.perf_counter() - t,
                         "export_seconds": doc["seconds"]["export"], "opset": o["graph"]["opset"],
                         "ir_version": o["graph"]["ir_version"], "verification": o["verification"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = 2**20
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    p = res["packed"]
    lines = [
        f"Measured by `python benchmarks/bench_export.py` on {res['cpu']['model']}, 1 thread; checkpoint: the built-in "
        "model (SmolLM2-135M, float32) pruned with wanda, uniform 70%.",
        "",
        "| artefact | size MiB | vs dense safetensors | notes |",
        "|---|---:|---:|---|",
        f"| dense safetensors (zeros stored) | {dense_st / mb:.1f} | 1.000 | what `owlctl prune` writes |",
        f"| packed (values + bitmask) | {p['packed_bytes'] / mb:.1f} | {p['packed_bytes'] / dense_st:.3f} | "
        f"prunable weights alone: {p['prunable_weights_ratio']:.3f} of dense; bit-exact: {p['bit_exact']} "
        f"({p['tensors_checked']} tensors); export {p['export_seconds']:.1f} s, load {p['load_seconds']:.1f} s |",
    ]
    for name, label in (("onnx_kv", "ONNX, KV cache"), ("onnx_no_kv", "ONNX, no KV cache")):
        o = res[name]
        lines.append(f"| {label} | {o['onnx_bytes'] / mb:.1f} | {o['onnx_bytes'] / dense_st:.3f} | opset "
                     f"{o['opset']}, IR {o['ir_version']}; onnxruntime vs PyTorch max abs diff "
                     f"{o['verification']['max_abs_diff']:.2e}; export + check {o['wall_seconds']:.1f} s |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
