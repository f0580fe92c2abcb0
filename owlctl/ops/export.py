"""`owlctl export`: a checkpoint as an ONNX graph (onnxruntime, DeepSparse) or as a packed sparse directory.

ONNX replaces the reference's ``sparseml.export --task text-generation`` (SPEC 9), which cannot serve here:
sparseml 1.8.0 needs transformers < 4.41, protobuf <= 3.20 and numpy < 2, and on torch 2.13 its
text-generation export fails. owlctl traces the model itself (engine/onnx_export.py), then runs the graph in
onnxruntime and compares its outputs with PyTorch before the directory is published.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError, ModelError
from owlctl.formats._io import SCHEMAS
from owlctl.options import DTYPE, FORCE, OUTPUT, ExportFormat, arg, opt

FORMATS = ("onnx", "packed")
ONNX_FILE = "model.onnx"
ONNX_JSON = "onnx-export.json"
ONNX_SCHEMA = SCHEMAS["onnx"]
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "allocation.json",
         "owlctl-report.json", "owlctl-source.json")


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


def _copy_side_files(src: Path, dst: Path, tok: Any, model: Any) -> None:
    for f in _COPY:
        if (src / f).is_file() and not (dst / f).exists():
            shutil.copy2(src / f, dst / f)
    if tok is not None and not (dst / "tokenizer_config.json").exists():
        tok.save_pretrained(dst)
    if not (dst / "config.json").exists():
        model.config.save_pretrained(dst)


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
    """Write ``cfg.output`` (a directory, atomically) and return the export document."""
    from owlctl.engine.models import model_config
    from owlctl.formats.checkpoint import checkpoint_writer
    from owlctl.ops.checks import model_inputs
    from owlctl.ops.common import output_claim

    _validate(cfg)
    model_config(cfg.checkpoint)  # a missing or broken model fails before the output is claimed
    out = Path(cfg.output)
    import torch

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ctx = progress.task(f"export {cfg.format}", total=2) if progress is not None else nullcontext(None)
    with output_claim(out, cfg.force, "dir", inputs=model_inputs(cfg.checkpoint)) as claim, ctx as task:
        from owlctl.engine.models import load_model

        model, tok, info = load_model(cfg.checkpoint, cfg.dtype)
        if task is not None:
            task.advance(1, info="loaded")
        src_dir = Path(info.path)
        source = {"id": info.id, "path": str(src_dir), "model_type": info.model_type,
                  "content_sha256": info.content_sha256, "revision": info.revision}
        t_load = time.perf_counter() - t0
        with checkpoint_writer(out, cfg.force, claim) as tmp:
            if cfg.format == "packed":
                doc = _export_packed(model, tmp, src_dir, source)
            else:
                doc = _export_onnx(model, tok, tmp, src_dir, source, cfg)
            doc["seconds"] = {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)}
            if cfg.format == "onnx":
                (tmp / ONNX_JSON).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        if task is not None:
            task.advance(1, info="written")
    doc["output"] = str(out)
    return doc


def _dense_safetensors_bytes(src: Path) -> int | None:
    files = sorted(src.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _export_packed(model: Any, tmp: Path, src_dir: Path, source: dict) -> dict:
    from owlctl.formats import packed

    head = packed.write_packed(model, tmp, src_dir, source)
    dense_file = _dense_safetensors_bytes(src_dir) if not packed.is_packed(src_dir) else None
    packed_w = head["packed_numel"]
    return {
        "schema": head["schema"], "owlctl_version": head["owlctl_version"], "format": "packed", "source": source,
        "files": sorted(p.name for p in tmp.iterdir()),
        "packed_tensors": head["packed_tensors"],
        "packed_sparsity": 1 - head["packed_nnz"] / packed_w if packed_w else 0.0,
        "dense_bytes": head["dense_bytes"],
        "dense_safetensors_bytes": dense_file,
        "packed_bytes": head["packed_bytes"],
        "size_ratio": head["size_ratio"],
        "load": "owlctl.formats.packed.load_packed(DIR) (bit-exact; sha256 checked per tensor)",
    }


def _export_onnx(model: Any, tok: Any, tmp: Path, src_dir: Path, source: dict, cfg: ExportConfig) -> dict:
    from owlctl import __version__
    from owlctl.deploy import onnx as onnx_export

    import torch

    if next(model.parameters()).dtype != torch.float32 and cfg.dtype == "auto":
        # onnxruntime's CPU kernels are float32 first; half-precision graphs often miss kernels there
        model.float()
    t = time.perf_counter()
    spec = onnx_export.export_onnx(model, tmp / ONNX_FILE, cfg.kv_cache)
    t_export = time.perf_counter() - t
    check = None
    if cfg.verify:
        t = time.perf_counter()
        check = onnx_export.verify_onnx(tmp / ONNX_FILE, model, spec, threads=cfg.threads)
        check["seconds"] = round(time.perf_counter() - t, 3)
        check["tolerance"] = cfg.tolerance
        if not check["max_abs_diff"] <= cfg.tolerance:  # also catches NaN
            raise ModelError(
                f"onnxruntime's outputs differ from PyTorch's by {check['max_abs_diff']:.3g} "
                f"(tolerance {cfg.tolerance:g}); the graph was not saved",
                hint="report the model type; --tolerance raises the limit if the difference is expected "
                     "(e.g. float16 weights)")
    _copy_side_files(src_dir, tmp, tok, model)
    import onnx

    proto = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
    files = sorted(p.name for p in tmp.iterdir()) + [ONNX_JSON]
    onnx_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix in (".onnx", ".data") or
                     p.name.endswith(".onnx.data"))
    return {
        "schema": ONNX_SCHEMA, "owlctl_version": __version__, "format": "onnx", "source": source,
        "graph": {"file": ONNX_FILE, "kv_cache": spec["kv_cache"], "opset": spec["opset"],
                  "ir_version": int(proto.ir_version), "inputs": spec["inputs"], "outputs": spec["outputs"],
                  "dynamic_axes": spec["dynamic_axes"], "geometry": spec["geometry"],
                  "vocab_size": spec["vocab_size"], "dtype": spec["dtype"], "position_ids": spec["position_ids"],
                  "exporter": "torch.onnx.export(dynamo=False) (TorchScript)", "attention": "eager"},
        "verification": check,
        "onnx_bytes": onnx_bytes,
        "dense_safetensors_bytes": _dense_safetensors_bytes(src_dir),
        "files": sorted(set(files)),
        "export_seconds": round(t_export, 3),
    }


def read_onnx_export(path: Path) -> dict:
    """The onnx-export.json of an export directory (checked), for reuse by `owlctl bench`."""
    from owlctl.formats._io import read_json

    return read_json(Path(path) / ONNX_JSON, "onnx", remake="owlctl export CHECKPOINT --format onnx -o DIR")


def is_onnx_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ONNX_FILE).is_file() and (p / ONNX_JSON).is_file()
