"""Loading a whole model into memory with transformers (the in-memory path), and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.models.device import resolve_device, resolve_dtype
from owlctl.engine.models.source import content_hash, local_dir, origin_id, pruned_from
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
                "num_blocks": num_blocks, "pruned_from": self.pruned_from}


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside a model (None when there is none)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path))
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
        if packed.is_packed(path):  # `owlctl export --format packed` output: values + bitmask
            model = packed.load_packed(path)
            if torch_dtype is not None:
                model.to(torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype or "auto")
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
