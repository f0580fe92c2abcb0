"""The only code in owlctl that knows Hugging Face module names.

A registry keyed by ``config.model_type`` gives, for each family, where the decoder blocks live and which
Linears inside a block are prunable, in execution order. Unknown model types fall back to a generic walk
(blocks from ``_no_split_modules``, Linears discovered) with a warning. A family is never guessed from a
substring of the model's name (SPEC 12.1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from owlctl.errors import ModelError


def _attn_width(cfg: dict) -> int | None:
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
    return heads * head_dim if heads and head_dim else None


def _llama_widths(cfg: dict) -> set[int]:
    """Input widths of q/k/v/gate/up (hidden), o_proj (heads x head_dim) and down_proj (intermediate)."""
    return {w for w in (cfg.get("hidden_size"), _attn_width(cfg), cfg.get("intermediate_size")) if w}


def _opt_widths(cfg: dict) -> set[int]:
    return {w for w in (cfg.get("hidden_size"), cfg.get("ffn_dim")) if w}


def _neox_widths(cfg: dict) -> set[int]:
    hidden = cfg.get("hidden_size")
    return {w for w in (hidden, cfg.get("intermediate_size") or (4 * hidden if hidden else None)) if w}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    blocks: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    linears: tuple[str, ...]  # prunable Linears relative to a block, in execution order
    # Linears that read the same input tensor share one activation statistic (q/k/v, gate/up).
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # config.json -> the input widths (C_in) of the prunable Linears, so N:M divisibility is checked
    # before any weight is read (the check on the loaded model stays as the authority).
    input_widths: Any = None


_LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_SHARED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

REGISTRY: dict[str, FamilySpec] = {}


def register(model_type: str, spec: FamilySpec) -> None:
    REGISTRY[model_type] = spec


for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    register(_t, FamilySpec(_t, "model.layers", _LLAMA_LIKE, _LLAMA_SHARED, _llama_widths))
register("phi3", FamilySpec("phi3", "model.layers",
                            ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                            input_widths=_llama_widths))
register("opt", FamilySpec("opt", "model.decoder.layers",
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                            "fc1", "fc2"),
                           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),), _opt_widths))
register("gpt_neox", FamilySpec("gpt_neox", "gpt_neox.layers",
                                ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                 "mlp.dense_4h_to_h"), input_widths=_neox_widths))


def config_input_widths(config: dict) -> set[int] | None:
    """The prunable Linears' input widths from a config.json dict (None for an unregistered family)."""
    spec = REGISTRY.get(config.get("model_type"))
    if spec is None or spec.input_widths is None:
        return None
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return spec.input_widths(cfg) or None


@dataclass
class ModelLayout:
    """A live model's blocks and prunable Linears, resolved from its family."""

    family: FamilySpec
    blocks_path: str
    blocks: Any  # nn.ModuleList
    linear_names: tuple[str, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def linears(self, i: int) -> dict[str, Any]:
        block = self.blocks[i]
        return {n: block.get_submodule(n) for n in self.linear_names}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(model: Any) -> ModelLayout:
    """Find the decoder blocks and prunable Linears of ``model`` (a transformers CausalLM)."""
    import torch.nn as nn

    model_type = getattr(model.config, "model_type", None)
    spec = REGISTRY.get(model_type)
    if spec is not None:
        try:
            blocks = _get(model, spec.blocks)
        except AttributeError:
            raise ModelError(f"model_type {model_type!r} has no {spec.blocks}; unexpected layout") from None
        missing = [n for n in spec.linears if not isinstance(_find(blocks[0], n), nn.Linear)]
        if missing:
            raise ModelError(f"{model_type} block 0 lacks Linears {missing}",
                             hint="this checkpoint's layout differs from the registered family; please report it")
        return ModelLayout(spec, spec.blocks, blocks, spec.linears)
    return _generic(model, model_type)


def _find(module: Any, name: str) -> Any:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _generic(model: Any, model_type: str | None) -> ModelLayout:
    import torch.nn as nn

    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and type(mod[0]).__name__ in block_classes:
            candidates.append((name, mod))
    if not candidates:
        raise ModelError(
            f"model_type {model_type!r} is not a registered family and no decoder blocks were found",
            hint="owlctl supports: " + ", ".join(sorted(REGISTRY)) + "; register the family in owlctl/families",
        )
    path, blocks = max(candidates, key=lambda c: len(c[1]))
    names = tuple(n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear))
    if not names:
        raise ModelError(f"decoder blocks at {path} contain no nn.Linear layers to prune")
    warnings.warn(f"model_type {model_type!r} is not registered; using blocks at {path} and "
                  f"{len(names)} discovered Linears per block", stacklevel=2)
    spec = FamilySpec(f"generic:{model_type}", path, names)
    return ModelLayout(spec, path, blocks, names)


def share_groups(layout: ModelLayout) -> dict[str, str]:
    """Map each Linear to the first Linear of its shared-input group (itself when it shares none)."""
    leader = {n: n for n in layout.linear_names}
    for group in layout.family.shared_inputs:
        for n in group:
            leader[n] = group[0]
    return leader
