"""Where a model's files are: a built-in model, a local directory, or a Hugging Face hub id; its config.json
and content hash without reading any weight."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from owlctl.engine.models.builtins import BUILTIN_MODELS, builtin_ids, builtin_model_dir
from owlctl.errors import InputError, ModelError


def local_dir(spec: str) -> tuple[Path, str | None]:
    """Map a model spec to a local directory (downloading hub ids through the HF cache)."""
    if spec in BUILTIN_MODELS:
        b = BUILTIN_MODELS[spec]
        return builtin_model_dir(spec), f"{b.package}=={b.version}"
    if spec.startswith("builtin:"):
        raise InputError(f"unknown built-in model {spec!r}", hint=f"the built-in models are {builtin_ids()}")
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p, None
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise InputError(f"model path {spec} does not exist")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception as e:  # network, auth, missing repo
        raise ModelError(f"could not fetch {spec!r} from the Hugging Face hub ({type(e).__name__}: {e})",
                         hint="check the id and your network, or pass a local model directory") from None
    return Path(path), None


def content_hash(path: Path) -> str:
    """sha256 over the config and the weight files' names and sizes and headers (cheap, stable)."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 24)))
    return h.hexdigest()


def model_config(spec: str) -> tuple[dict, Path | None]:
    """(config.json as a dict, local directory or None) without reading any weights and without torch, so
    the checks that need only shapes and the context length run in seconds before a long load."""
    p = Path(spec).expanduser()
    if spec.startswith("builtin:") or p.exists():
        path, _ = local_dir(spec)
        cfg = path / "config.json"
    else:
        path = None
        try:
            from huggingface_hub import hf_hub_download

            cfg = Path(hf_hub_download(spec, "config.json"))
        except Exception as e:  # network, auth, missing repo
            raise ModelError(f"could not fetch the config of {spec!r} from the Hugging Face hub "
                             f"({type(e).__name__}: {e})",
                             hint="check the id and your network, or pass a local model directory") from None
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg} is not a readable config.json ({type(e).__name__})",
                         hint="the model directory may be incomplete or corrupt") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{cfg} is not a JSON object", hint="the model directory may be incomplete or corrupt")
    return doc, path


def origin_id(spec: str, path: Path | None) -> str:
    """The model id a spec stands for: a checkpoint written by owlctl remembers the model it came from."""
    if spec.startswith("builtin:") or path is None:
        return spec
    meta = Path(path) / "owlctl-source.json"
    if meta.is_file():
        try:
            got = json.loads(meta.read_text(encoding="utf-8")).get("id")
        except (OSError, ValueError, AttributeError):
            got = None
        if isinstance(got, str):
            return got
    return spec


def pruned_from(path: Path | None) -> dict | None:
    """owlctl-source.json of a checkpoint owlctl wrote (the model it was pruned from), else None."""
    meta = Path(path) / "owlctl-source.json" if path is not None else None
    if meta is None or not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("id", "content_sha256", "method", "finetuned_from", "finetune_mode")
    return {k: doc.get(k) for k in keys if k in doc} if isinstance(doc, dict) and "id" in doc else None


def describe(spec: str) -> dict:
    """The model reference of every owlctl document (formats.documents.ModelRef) without loading weights."""
    from owlctl.families import REGISTRY

    config, path = model_config(spec)
    path = path or local_dir(spec)[0]
    mt = config.get("model_type")
    return {"id": origin_id(spec, path), "spec": spec, "path": str(path), "revision": None,
            "content_sha256": content_hash(path), "model_type": mt,
            "family": REGISTRY[mt].name if mt in REGISTRY else None,
            "num_blocks": config.get("num_hidden_layers"), "pruned_from": pruned_from(path)}
