"""Where a model's files are: a built-in model, a local directory, or a Hugging Face hub id; its config.json
and content hash without reading any weight."""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from owlctl.engine.models.builtins import BUILTIN_MODELS, builtin_ids, builtin_model_dir
from owlctl.errors import InputError, ModelError


@dataclass(frozen=True)
class HubSettings:
    """How hub ids are fetched and loaded, set once per command (``--revision``, ``--trust-remote-code``);
    the token is huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``)."""

    revision: str | None = None
    trust_remote_code: bool = False


_HUB = contextvars.ContextVar("owlctl_hub", default=HubSettings())
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
OFFLINE_HINT = ("to work offline, download the model once and set HF_HUB_OFFLINE=1 (owlctl then uses the copy in "
                "the Hugging Face cache), or pass a local model directory")


def hub_settings() -> HubSettings:
    return _HUB.get()


@contextmanager
def hub(revision: str | None = None, trust_remote_code: bool = False) -> Iterator[HubSettings]:
    """Within this context, hub ids resolve at ``revision`` and models may run their own code if allowed."""
    token = _HUB.set(HubSettings(revision, trust_remote_code))
    try:
        yield _HUB.get()
    finally:
        _HUB.reset(token)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds (no request is sent)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _snapshot(spec: str, patterns: list[str]) -> Path:
    """The local snapshot of hub repo ``spec`` at the requested revision: from the cache when offline (or
    when the hub cannot be reached), else downloaded. Fails in seconds without a network."""
    from huggingface_hub import snapshot_download

    revision = hub_settings().revision
    offline = _offline() or not _hub_reachable()
    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # no cached copy offline, auth, missing repo or revision
        if offline:
            why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
            raise ModelError(f"{spec!r} is not in the Hugging Face cache and {why}", hint=OFFLINE_HINT) from None
        raise ModelError(f"could not fetch {spec!r}" + (f" at revision {revision}" if revision else "") +
                         f" from the Hugging Face hub ({type(e).__name__}: {e})",
                         hint="check the id, the revision and your access (HF_TOKEN for gated models), or pass "
                              "a local model directory") from None


def revision_of(path: Path) -> str | None:
    """The commit a hub snapshot directory holds (its name in the HF cache), else None."""
    name = Path(path).name
    return name if Path(path).parent.name == "snapshots" and len(name) == 40 else None


def local_dir(spec: str) -> tuple[Path, str | None]:
    """Map a model spec to (local directory, revision): downloading hub ids through the HF cache (the
    revision is then the resolved commit), converting a built-in model once."""
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
    path = _snapshot(spec, _WEIGHT_PATTERNS)
    return path, revision_of(path) or hub_settings().revision


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
        cfg = _snapshot(spec, ["config.json"]) / "config.json"
        if not cfg.is_file():
            raise ModelError(f"hub repo {spec!r} has no config.json", hint="is it a transformers model?")
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
    return {"id": origin_id(spec, path), "spec": spec, "path": str(path), "revision": revision_of(path),
            "content_sha256": content_hash(path), "model_type": mt,
            "family": REGISTRY[mt].name if mt in REGISTRY else None,
            "num_blocks": config.get("num_hidden_layers"), "pruned_from": pruned_from(path)}
