"""`owlctl export`: a checkpoint as an ONNX graph (onnxruntime, DeepSparse) or as a packed sparse directory.

ONNX replaces the reference's ``sparseml.export --task text-generation`` (SPEC 9), which cannot serve here:
sparseml 1.8.0 needs transformers < 4.41, protobuf <= 3.20 and numpy < 2, and on torch 2.13 its
text-generation export fails. owlctl traces the model itself (deploy/onnx.py), then runs the graph in
onnxruntime and compares its outputs with PyTorch before the directory is published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError
from owlctl.options import DTYPE, FORCE, OUTPUT, ExportFormat, arg, opt

FORMATS = ExportFormat.values()


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    checkpoint: str = arg("Checkpoint directory, packed directory, HF hub id, or a built-in model.")()
    output: Path = OUTPUT(help="Directory to write.")
    format: str = opt("--format", help="onnx (graph for onnxruntime / DeepSparse) | packed (values + bitmask).",
                      choices=ExportFormat)("onnx")
    # onnx: past key/values in, present out (one graph serves prompt and decode)
    kv_cache: bool = opt("--kv-cache/--no-kv-cache", help="onnx: past key/values in, present out (for "
                         "decoding).")(True)
    # onnx: largest allowed |onnxruntime - PyTorch| over the checked outputs
    tolerance: float = opt("--tolerance", help="onnx: largest allowed |onnxruntime - PyTorch| on the checked "
                           "outputs.")(1e-3)
    verify: bool = opt("--verify/--no-verify", help="onnx: check the graph in onnxruntime against PyTorch.")(True)
    threads: int = opt("--threads", help="CPU threads for tracing and the check.", min=1)(1)
    dtype: str = DTYPE("auto")
    force: bool = FORCE(False)


def _validate(cfg: ExportConfig) -> None:
    from owlctl.ops.checks import require
    from owlctl.options import check_choice, finite

    check_choice("--format", cfg.format, ExportFormat)
    finite("--tolerance", cfg.tolerance, lo=0.0, lo_open=True)
    if cfg.threads < 1:
        raise InputError("--threads must be >= 1")
    if cfg.format == "onnx":  # before the model is loaded and traced
        require("onnx", "export --format onnx", "onnx")
        if cfg.verify:
            require("onnxruntime", "export --format onnx (its onnxruntime check)", "onnx")


def export(cfg: ExportConfig, progress: Any = None) -> dict:
    """Write ``cfg.output`` (a directory, atomically) and return the export document (owlctl.export)."""
    from owlctl.engine.models import model_config
    from owlctl.formats._io import header
    from owlctl.formats.checkpoint import checkpoint_writer
    from owlctl.ops.checks import model_inputs
    from owlctl.ops.common import output_claim
    from owlctl.progress import task as progress_task

    _validate(cfg)
    model_config(cfg.checkpoint)  # a missing or broken model fails before the output is claimed
    out = Path(cfg.output)
    import torch

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    with output_claim(out, cfg.force, "dir", inputs=model_inputs(cfg.checkpoint)) as claim, \
            progress_task(progress, f"export {cfg.format}", 2) as task:
        from owlctl.engine.models import load_model

        model, tok, info = load_model(cfg.checkpoint, cfg.dtype)
        task.advance(1, info="loaded")
        src_dir = Path(info.path)
        seconds = {"load": round(time.perf_counter() - t0, 3)}
        doc = {**header("export", "export", info.as_dict(), seconds), "format": cfg.format, "output": str(out), "files": [],
               "dense_safetensors_bytes": _dense_safetensors_bytes(src_dir)}
        with checkpoint_writer(out, cfg.force, claim) as tmp:
            if cfg.format == "packed":
                doc["packed"] = _export_packed(model, tok, tmp, src_dir, info)
                doc["files"] = sorted(p.name for p in tmp.iterdir())
            else:
                from owlctl.deploy.onnx import write_export

                doc = write_export(model, tok, info, tmp, kv_cache=cfg.kv_cache, verify=cfg.verify,
                                   tolerance=cfg.tolerance, threads=cfg.threads, cast_float=cfg.dtype == "auto",
                                   seconds=seconds)
            doc["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        task.advance(1, info="written")
    doc["output"] = str(out)
    return doc


def _dense_safetensors_bytes(src: Path) -> int | None:
    from owlctl.formats import packed

    files = sorted(src.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files and not packed.is_packed(src) else None


def _export_packed(model: Any, tok: Any, tmp: Path, src_dir: Path, info: Any) -> dict:
    """The packed directory (owlctl.packed header in packed.json) and its summary for the export document."""
    from owlctl.formats import packed

    head = packed.write_packed(model, tmp, src_dir, info.as_dict(), tok=tok)
    keys = ("packed_tensors", "packed_numel", "packed_nnz", "realised_sparsity", "dense_bytes", "packed_bytes",
            "size_ratio")
    return {**{k: head[k] for k in keys},
            "load": "owlctl.formats.packed.load_packed(DIR) (bit-exact; sha256 checked per tensor)"}
