"""ONNX graphs for causal-LM inference, written with torch's legacy TorchScript exporter.

Why the legacy exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` writes opset 17 / IR 8
graphs that both onnxruntime and DeepSparse 1.8.0 run; the default dynamo exporter of torch 2.13 writes IR 10,
which DeepSparse rejects.

Two graph kinds (one per export; ``onnx-export.json`` beside ``model.onnx`` says which):

  no KV cache   input_ids (B, S) int64, attention_mask (B, S) int64  ->  logits (B, S, V)
  KV cache      input_ids (B, S), attention_mask (B, P + S),
                past_key_values.{i}.key / .value (B, H_kv, P, D) for every block i
                ->  logits (B, S, V), present.{i}.key / .value (B, H_kv, P + S, D)

All batch and sequence axes are dynamic. Position ids are computed inside the graph from the attention mask
(cumsum - 1), so left padding and a fixed-size cache with masked empty slots both work; P may be 0 for the
prompt in onnxruntime. Attention is exported in its eager form (plain MatMul/Softmax ops).

Why one module of ~330 lines: the exporter, the onnxruntime runner that checks its graph, and the export
directory change together (the graph's inputs are what the runner feeds and what the directory records).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

from owlctl.errors import ModelError

OPSET = 17


def _cache_kwarg(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def cache_tensors(cache: Any) -> list[Any]:
    """Flatten a transformers Cache into [k0, v0, k1, v1, ...] (each (B, H_kv, T, D))."""
    if hasattr(cache, "layers"):
        out = []
        for layer in cache.layers:
            out += [layer.keys, layer.values]
        return out
    if isinstance(cache, (tuple, list)):  # legacy tuple of (k, v)
        return [t for kv in cache for t in kv[:2]]
    raise ModelError(f"unsupported cache type {type(cache).__name__}",
                     hint="export with --no-kv-cache, or use a model family owlctl lists in `owlctl export --help`")


def make_cache(config: Any, flat: list[Any]) -> Any:
    """A DynamicCache holding [k0, v0, k1, v1, ...]."""
    from transformers import DynamicCache

    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
    try:
        return DynamicCache(ddp_cache_data=pairs, config=config)
    except TypeError:
        return DynamicCache(ddp_cache_data=pairs)


def _make_wrapper(model: Any, kv_cache: bool, num_layers: int) -> Any:
    import torch

    cache_kw = _cache_kwarg(model)

    class CausalLMGraph(torch.nn.Module):
        """Plain tensors in and out, so the TorchScript tracer sees no Cache objects or dataclasses."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> Any:
            seq = input_ids.shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            if not kv_cache:
                return self.model(**kw, use_cache=False).logits
            kw[cache_kw] = make_cache(self.model.config, list(past))
            out = self.model(**kw, use_cache=True)
            flat = cache_tensors(_out_cache(out))
            if len(flat) != 2 * num_layers:
                raise ModelError(f"the model returned {len(flat) // 2} cache layers for {num_layers} blocks")
            return (out.logits, *flat)

    return CausalLMGraph()


def io_names(num_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    if kv_cache:
        ins += [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        outs += [f"present.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    return ins, outs


def kv_geometry(model: Any) -> dict:
    """Blocks, KV heads and head size, read from a one-token forward (robust across families)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    cache = _out_cache(out)
    if cache is None:
        raise ModelError(f"{type(model).__name__} returns no KV cache",
                         hint="export with --no-kv-cache")
    flat = cache_tensors(cache)
    k = flat[0]
    if k.dim() != 4:
        raise ModelError(f"unexpected KV cache tensor of shape {tuple(k.shape)}", hint="export with --no-kv-cache")
    return {"num_layers": len(flat) // 2, "kv_heads": int(k.shape[1]), "head_dim": int(k.shape[3]),
            "dtype": str(k.dtype).replace("torch.", "")}


def sample_inputs(geom: dict | None, batch: int, seq: int, past: int, vocab: int, dtype: Any,
                  seed: int = 0, pad_left: int = 0) -> list[Any]:
    """Random token ids, an attention mask (first row left-padded by ``pad_left``) and random past KV."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad_left:
        mask[0, :pad_left] = 0
    tensors = [ids, mask]
    if geom is not None:
        shape = (batch, geom["kv_heads"], past, geom["head_dim"])
        tensors += [torch.randn(shape, generator=g).to(dtype) for _ in range(2 * geom["num_layers"])]
    return tensors


def export_onnx(model: Any, path: Path, kv_cache: bool) -> dict:
    """Trace ``model`` (a transformers CausalLM on CPU) into ``path`` (model.onnx). Returns the io spec."""
    import torch

    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - some models pin their attention; keep theirs
            pass
    model.config.use_cache = kv_cache
    try:
        geom = kv_geometry(model) if kv_cache else None
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a forward that fails is an unsupported architecture
        raise ModelError(f"{type(model).__name__} could not run a KV-cache forward ({type(e).__name__}: {e})",
                         hint="export with --no-kv-cache, or report the model type") from None
    num_layers = geom["num_layers"] if geom else 0
    wrapper = _make_wrapper(model, kv_cache, num_layers).eval()
    vocab = int(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    # trace with a non-trivial past so the concatenation path is the one recorded (P = 0 still runs)
    args = sample_inputs(geom, batch=2, seq=4, past=3 if kv_cache else 0, vocab=vocab, dtype=dtype)
    ins, outs = io_names(num_layers, kv_cache)
    dyn: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    dyn["attention_mask"] = {0: "batch", 1: "total_sequence" if kv_cache else "sequence"}
    for n in ins[2:]:
        dyn[n] = {0: "batch", 2: "past_sequence"}
    for n in outs[1:]:
        dyn[n] = {0: "batch", 2: "total_sequence"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(args), str(path), input_names=ins, output_names=outs,
                              dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the tracer raises many types for unsupported code
        raise ModelError(
            f"ONNX export of {type(model).__name__} (model_type {model.config.model_type!r}) failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="try --no-kv-cache; owlctl's exporter is tested on llama, mistral, qwen2, qwen3, gemma, gemma2, "
                 "gemma3_text, phi3, opt and gpt_neox; report other model types with this message") from None
    axes = {k: {str(a): name for a, name in v.items()} for k, v in dyn.items()}  # JSON keys are strings
    return {"kv_cache": kv_cache, "opset": OPSET, "inputs": ins, "outputs": outs, "dynamic_axes": axes,
            "geometry": geom, "vocab_size": vocab, "dtype": str(dtype).replace("torch.", ""),
            "position_ids": "computed in the graph: cumsum(attention_mask) - 1"}


def ort_session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_generate(sess: Any, graph: dict, ids: Any, steps: int) -> dict:
    """Greedy decoding with a KV-cache graph in onnxruntime: the prompt ``ids`` (B, L) int64 with an empty
    past, then ``steps`` one-token steps feeding each present back as the next past. Returns the seconds of
    the prompt and of every step, and the prompt's last-position logits (B, V)."""
    import time

    import numpy as np

    geom, names = graph["geometry"], graph["inputs"]
    b, n = ids.shape
    past = [np.zeros((b, geom["kv_heads"], 0, geom["head_dim"]), dtype=np.float32)
            for _ in range(2 * geom["num_layers"])]
    t0 = time.perf_counter()
    out = sess.run(None, dict(zip(names, [ids, np.ones((b, n), dtype=np.int64), *past])))
    nxt = out[0][:, -1, :].argmax(-1)[:, None].astype(np.int64)
    t_prefill = time.perf_counter() - t0
    first = out[0][:, -1, :].copy()
    cache = out[1:]
    step_s = []
    for i in range(steps):
        mask = np.ones((b, n + i + 1), dtype=np.int64)
        t0 = time.perf_counter()
        out = sess.run(None, dict(zip(names, [nxt, mask, *cache])))
        nxt = out[0][:, -1, :].argmax(-1)[:, None].astype(np.int64)
        cache = out[1:]
        step_s.append(time.perf_counter() - t0)
    return {"prefill_s": t_prefill, "step_s": step_s, "first_logits": first}


def verify_onnx(path: Path, model: Any, spec: dict, threads: int = 1) -> dict:
    """Run the graph in onnxruntime and compare every output with PyTorch (the same wrapper, eager).

    Cases: a prompt (batch 2, 7 tokens, no past, row 0 left-padded by 2) and, for KV graphs, one decode step
    whose past is PyTorch's present from the prompt. Returns {"max_abs_diff": float, "cases": [...]}.
    """
    import numpy as np
    import torch

    sess = ort_session(path, threads)
    geom = spec["geometry"]
    kv = spec["kv_cache"]
    wrapper = _make_wrapper(model, kv, geom["num_layers"] if geom else 0).eval()
    dtype = next(model.parameters()).dtype
    pad = 2
    prompt = sample_inputs(geom, 2, 7, 0, spec["vocab_size"], dtype, seed=1, pad_left=pad)
    cases = [("prompt", prompt)]
    if kv:
        with torch.no_grad():
            present = wrapper(*prompt)[1:]
        g = torch.Generator().manual_seed(2)
        step_ids = torch.randint(0, spec["vocab_size"], (2, 1), generator=g)
        step_mask = torch.cat([prompt[1], torch.ones(2, 1, dtype=torch.long)], dim=1)
        cases.append(("decode", [step_ids, step_mask, *present]))
    results, worst = [], 0.0
    for name, args in cases:
        with torch.no_grad():
            ref = wrapper(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {n: a.numpy() for n, a in zip(spec["inputs"], args)})
        diff = 0.0
        for g_out, r in zip(got, ref):
            r = r.float().numpy()
            if g_out.shape != r.shape:
                raise ModelError(f"onnxruntime output shape {g_out.shape} differs from PyTorch {r.shape} ({name})")
            g_out = g_out.astype(np.float32)
            if name == "prompt" and g_out.ndim == 3:  # row 0's padded query positions attend to nothing
                g_out, r = g_out[:, pad:], r[:, pad:]
            diff = max(diff, float(np.max(np.abs(g_out - r))))
        past = 0 if name == "prompt" else args[2].shape[2]
        results.append({"case": name, "batch": 2, "sequence": args[0].shape[1], "past": past,
                        "left_pad": pad, "max_abs_diff": diff})
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "cases": results}


# ------------------------------------------------------------------------------------------ export dir
ONNX_FILE = "model.onnx"
ONNX_JSON = "onnx-export.json"  # the export document (owlctl.export) beside the graph, read by `bench`


def write_onnx_dir(model: Any, tok: Any, tmp: Path, src_dir: Path, *, kv_cache: bool, verify: bool,
                   tolerance: float, threads: int, cast_float: bool) -> tuple[dict, dict]:
    """Export, check in onnxruntime (refusing a graph whose outputs differ from PyTorch's beyond
    ``tolerance``) and copy the side files into ``tmp``; returns (the ``onnx`` section, seconds)."""
    import time

    import torch

    from owlctl.errors import ModelError
    from owlctl.formats.checkpoint import copy_side_files

    if cast_float and next(model.parameters()).dtype != torch.float32:
        model.float()  # onnxruntime's CPU kernels are float32 first; half-precision graphs often miss kernels
    t = time.perf_counter()
    spec = export_onnx(model, tmp / ONNX_FILE, kv_cache)
    seconds = {"export": round(time.perf_counter() - t, 3)}
    check = None
    if verify:
        t = time.perf_counter()
        check = verify_onnx(tmp / ONNX_FILE, model, spec, threads=threads)
        seconds["verify"] = round(time.perf_counter() - t, 3)
        check["tolerance"] = tolerance
        if not check["max_abs_diff"] <= tolerance:  # also catches NaN
            raise ModelError(
                f"onnxruntime's outputs differ from PyTorch's by {check['max_abs_diff']:.3g} "
                f"(tolerance {tolerance:g}); the graph was not saved",
                hint="report the model type; --tolerance raises the limit if the difference is expected "
                     "(e.g. float16 weights)")
    copy_side_files(src_dir, tmp, tok, model)
    import onnx

    proto = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
    onnx_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix in (".onnx", ".data") or
                     p.name.endswith(".onnx.data"))
    graph = {"file": ONNX_FILE, "kv_cache": spec["kv_cache"], "opset": spec["opset"],
             "ir_version": int(proto.ir_version), "inputs": spec["inputs"], "outputs": spec["outputs"],
             "dynamic_axes": spec["dynamic_axes"], "geometry": spec["geometry"], "vocab_size": spec["vocab_size"],
             "dtype": spec["dtype"], "position_ids": spec["position_ids"],
             "exporter": "torch.onnx.export(dynamo=False) (TorchScript)", "attention": "eager"}
    return {"graph": graph, "verification": check, "onnx_bytes": onnx_bytes}, seconds


def write_export(model: Any, tok: Any, info: Any, tmp: Path, *, kv_cache: bool = True, verify: bool = True,
                 tolerance: float = 1e-3, threads: int = 1, cast_float: bool = True,
                 seconds: dict | None = None) -> dict:
    """The whole ONNX export directory in ``tmp``: graph, side files and onnx-export.json (the export
    document, which is also returned)."""
    import time

    from owlctl.formats._io import dumps, header
    from owlctl.formats.documents import validate

    t0 = time.perf_counter()
    onnx_doc, more = write_onnx_dir(model, tok, tmp, Path(info.path), kv_cache=kv_cache, verify=verify,
                                    tolerance=tolerance, threads=threads, cast_float=cast_float)
    files = sorted({p.name for p in tmp.iterdir()} | {ONNX_JSON})
    st = sorted(Path(info.path).glob("*.safetensors"))
    doc = {**header("export", "export", info.as_dict(), {**(seconds or {}), **more,
                                                          "total": round(time.perf_counter() - t0, 3)}),
           "format": "onnx", "output": None, "files": files,
           "dense_safetensors_bytes": sum(f.stat().st_size for f in st) or None, "onnx": onnx_doc}
    (tmp / ONNX_JSON).write_text(dumps(validate("export", doc)))
    return doc


def read_onnx_export(path: Path) -> dict:
    """The export document of an ONNX export directory (checked; older onnx-export.json files upgraded)."""
    from owlctl.formats._io import read_json

    return read_json(Path(path) / ONNX_JSON, "export", remake="owlctl export CHECKPOINT --format onnx -o DIR")


def is_onnx_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ONNX_FILE).is_file() and (p / ONNX_JSON).is_file()
