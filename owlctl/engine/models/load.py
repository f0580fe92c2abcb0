"""Opening a model: the whole model in memory with transformers, or streamed block by block from its files
(``--offload auto|none|disk``), and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.models.device import resolve_device, resolve_dtype
from owlctl.engine.models.source import content_hash, hub_settings, local_dir, origin_id, pruned_from
from owlctl.errors import ModelError


@dataclass
class ModelInfo:
    id: str  # what the model is: for an owlctl checkpoint, the model it was pruned from
    model_type: str
    revision: str | None
    content_sha256: str
    path: str  # local directory the weights came from
    spec: str | None = None  # what was given (a hub id, a directory, builtin:...)
    pruned_from: dict | None = None  # owlctl-source.json of a checkpoint written by owlctl

    def as_dict(self, family: str | None = None, num_blocks: int | None = None) -> dict:
        """The one model shape of every owlctl document (formats.documents.ModelRef)."""
        return {"id": self.id, "spec": self.spec, "path": self.path, "revision": self.revision,
                "content_sha256": self.content_sha256, "model_type": self.model_type, "family": family,
                "num_blocks": num_blocks, "trust_remote_code": hub_settings().trust_remote_code,
                "pruned_from": self.pruned_from}


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside a model (None when there is none)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=hub_settings().trust_remote_code)
    except (OSError, ValueError):
        return None


def load_model(spec: str, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any, ModelInfo]:
    """Load (model, tokenizer, info). The model is left on CPU; the driver moves one block at a time."""
    import torch  # noqa: F401
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from owlctl.progress import note

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    path, revision = local_dir(spec)
    torch_dtype = resolve_dtype(dtype)
    from owlctl.formats import packed

    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    note(f"loading {spec}" + (f" ({size / 2**20:,.0f} MiB of weights)" if size else ""))
    try:
        if not packed.is_packed(path):
            from owlctl.engine.models.stream import refuse_pickle

            refuse_pickle(path)
        if packed.is_packed(path):  # `owlctl export --format packed` output: values + bitmask
            model = packed.load_packed(path)
            if torch_dtype is not None:
                model.to(torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype or "auto", use_safetensors=True,
                                                         trust_remote_code=hub_settings().trust_remote_code)
    except SafetensorError as e:
        raise ModelError(f"the weights of {spec} cannot be read: {e}",
                         hint="a .safetensors file is truncated or corrupt; download or re-create it") from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"transformers could not load {spec}: {e}") from None
    model.eval()
    model.config.use_cache = False
    tok = load_tokenizer(path)
    info = ModelInfo(id=origin_id(spec, path), model_type=model.config.model_type,
                     revision=revision, content_sha256=content_hash(path), path=str(path), spec=spec,
                     pruned_from=pruned_from(path))
    if device != "cpu":
        resolve_device(device)
    return model, tok, info


# --offload auto streams a model whose weights (in the compute dtype) exceed this fraction of the memory
# available: the in-memory path peaks at ~1.45x the weights for one prune (measured, docs/memory.md) and the
# pipeline holds up to three copies, so a third of the memory is where it stops being safe.
AUTO_STREAM_FRACTION = 1 / 3


def weights_nbytes(path: Path, dtype: Any = None) -> int:
    """Bytes the model's tensors take in ``dtype`` (floating tensors; others as stored), from the headers."""
    from owlctl.engine.models.stream import read_header
    from owlctl.formats.shards import DTYPES

    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    target = DTYPES[str(dtype).removeprefix("torch.")][1] if dtype is not None else None
    total = 0
    for f in Path(path).glob("*.safetensors"):
        for entry in read_header(f).values():
            numel = 1
            for d in entry["shape"]:
                numel *= d
            per = size.get(entry["dtype"])
            total += numel * (target if (target and per) else (per or 1))
    return total


def choose_offload(offload: str, path: Path, dtype: Any) -> str:
    """"none" (in memory) or "disk" (streamed) for ``--offload auto|none|disk``."""
    if offload != "auto":
        return offload
    from owlctl.engine.memory import available_bytes

    avail = available_bytes()
    if avail is None:
        return "none"
    return "disk" if weights_nbytes(path, dtype) > AUTO_STREAM_FRACTION * avail else "none"


def open_model(spec: str, dtype: str = "auto", offload: str = "auto") -> tuple[Any, Any, ModelInfo]:
    """(host, tokenizer, info): the model in memory (hosts.InMemory) or streamed from its files
    (hosts.Streamed), by ``offload``. A packed export is always loaded into memory."""
    from owlctl.engine.models.hosts import InMemory, Streamed
    from owlctl.formats import packed
    from owlctl.progress import note

    if offload not in ("auto", "none", "disk"):
        raise ModelError(f"unknown --offload {offload!r}")
    path, revision = local_dir(spec)
    torch_dtype = resolve_dtype(dtype)
    mode = "none" if packed.is_packed(path) else choose_offload(offload, path, torch_dtype)
    if mode == "none":
        model, tok, info = load_model(spec, dtype)
        return InMemory(model), tok, info
    from owlctl.engine.models.stream import refuse_pickle

    refuse_pickle(path)
    note(f"streaming {spec} from disk, one block at a time ({weights_nbytes(path, torch_dtype) / 2**20:,.0f} MiB "
         "of weights)")
    host = Streamed(path, torch_dtype, trust_remote_code=hub_settings().trust_remote_code)
    tok = load_tokenizer(path)
    info = ModelInfo(id=origin_id(spec, path), model_type=host.model.config.model_type, revision=revision,
                     content_sha256=content_hash(path), path=str(path), spec=spec, pruned_from=pruned_from(path))
    return host, tok, info
