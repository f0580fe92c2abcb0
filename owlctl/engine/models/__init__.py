"""Models: where their files are (hub ids, local directories, built-in models in the cache), their config
and content hash without reading weights, and loading them.

    model_config(spec)        config.json as a dict, and the local directory (no torch, no weights)
    local_dir(spec)           the directory holding the model (downloads a hub id; converts a built-in once)
    load_model(spec, dtype)   (model, tokenizer, ModelInfo): the whole model in memory
    open_model(spec, dtype, offload)  (host, tokenizer, ModelInfo): in memory or streamed (engine/models/hosts)
    hub(revision, trust_remote_code)  how hub ids are fetched and loaded, for one command
    cache_dir()               the owlctl cache
"""

from owlctl.engine.models.builtins import BUILTIN_MODEL, BUILTIN_MODELS, builtin_ids, builtin_model_dir, is_builtin
from owlctl.engine.models.cache import cache_dir
from owlctl.engine.models.device import resolve_device, resolve_dtype
from owlctl.engine.models.load import ModelInfo, load_model, load_tokenizer, open_model
from owlctl.engine.models.source import content_hash, describe, hub, local_dir, model_config, origin_id

__all__ = ["BUILTIN_MODEL", "BUILTIN_MODELS", "ModelInfo", "builtin_ids", "builtin_model_dir", "cache_dir",
           "content_hash", "describe", "hub", "is_builtin", "load_model", "open_model", "load_tokenizer", "local_dir", "model_config", "origin_id",
           "resolve_device", "resolve_dtype"]
