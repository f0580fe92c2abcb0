"""`owlctl generate`: text from a (pruned) model on the CPU, streamed as it is produced.

The prompt goes through the tokenizer's chat template when it has one (``raw`` turns that off), is
prefilled once, then one token per step is decoded through the KV cache (deploy/runtimes/generation.py),
greedy unless a temperature is given. ``torch-sparse`` first swaps the prunable Linears for owlctl's sparse
CPU kernels (deploy/kernels), exactly as ``bench --backend torch-sparse`` does; without a C compiler that
falls back to torch's CSR kernels with a warning. The text is handed to ``on_text`` piece by piece; the
returned ``owlctl.generate`` document holds the whole text and the timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError, ModelError
from owlctl.options import DTYPE, GenerateBackend, SparseKernel, arg, finite, opt


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    model: str = arg("Model: checkpoint or packed directory, HF hub id, or a built-in model (builtin:...).")()
    prompt: str = opt("--prompt", "-p", help="The text to continue (or the user message, with a chat "
                      "template).")()
    backend: str = opt("--backend", help="torch (dense kernels) | torch-sparse (owlctl's sparse CPU kernels).",
                       choices=GenerateBackend)("torch")
    max_new_tokens: int = opt("--max-new-tokens", "-n", help="Most tokens to generate (EOS stops earlier).",
                              min=1)(128)
    threads: int | None = opt("--threads", help="CPU threads for torch and the sparse kernels (default: the "
                              "CPUs this process may use).", min=1)(None)
    raw: bool = opt("--raw", help="Feed the prompt as it is, without the tokenizer's chat template.")(False)
    temperature: float = opt("--temperature", help="0 = greedy (the most likely token); above 0: sample from "
                             "softmax(logits / temperature).", min=0.0)(0.0)
    top_p: float = opt("--top-p", help="Sampling only: keep the smallest set of tokens whose probability reaches "
                       "this fraction (nucleus sampling).", min=0.0, max=1.0)(1.0)
    seed: int = opt("--seed", help="Seed of the sampler (with --temperature).")(0)
    sparse_kernel: str = opt("--sparse-kernel", help="torch-sparse: bitmask (best ISA for this CPU), "
                             "bitmask-ISA (forced), torch-csr, torch-bsr.", choices=SparseKernel)("auto")
    dtype: str = DTYPE("auto")

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise InputError("--prompt is empty", hint='give the text to continue, e.g. --prompt "Once upon a time"')
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        finite("--temperature", self.temperature, lo=0.0)
        finite("--top-p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        if self.backend not in GenerateBackend.values():
            raise InputError(f"unknown backend {self.backend!r}", hint="use torch or torch-sparse")


def _check_model(spec: str) -> None:
    """A path that does not exist is a missing directory, not a hub id to look up."""
    if spec.startswith(("/", "./", "../", "~")) or spec in (".", ".."):
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise ModelError(f"no model directory at {spec}",
                             hint="pass a checkpoint directory (owlctl prune ... -o DIR), an HF hub id, or "
                                  "builtin:smollm2-135m")
    from owlctl.engine.models import model_config

    model_config(spec)


def prompt_ids(tok: Any, prompt: str, raw: bool) -> tuple[list[int], bool]:
    """The prompt's token ids and whether the chat template made them."""
    if not raw and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(i) for i in ids], True
    return [int(i) for i in tok(prompt)["input_ids"]], False


def eos_ids(model: Any, tok: Any) -> set[int]:
    """Every id that ends generation: the generation config's eos_token_id (int or list) and the tokenizer's."""
    out: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            out.update([e] if isinstance(e, int) else [int(x) for x in e])
            break
    if getattr(tok, "eos_token_id", None) is not None:
        out.add(int(tok.eos_token_id))
    return out


def generate(cfg: GenerateConfig, on_text: Callable[[str], None] = lambda s: None, log: Callable[[str], None]
             = lambda s: None) -> dict:
    """Generate, handing text increments to ``on_text``; return the ``owlctl.generate`` document."""
    _check_model(cfg.model)
    import torch

    from owlctl.deploy.kernels.linear import default_threads
    from owlctl.deploy.runtimes.generation import Generated, Sampler, TextPieces
    from owlctl.deploy.runtimes.generation import generate as run
    from owlctl.engine.models import load_model
    from owlctl.formats._io import header

    threads = cfg.threads or default_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        model, tok, info = load_model(cfg.model, cfg.dtype)
        if tok is None:
            raise ModelError(f"{cfg.model} has no tokenizer", hint="generate needs the tokenizer files in the "
                             "model directory (tokenizer.json, tokenizer_config.json)")
        sparse = None
        if cfg.backend == "torch-sparse":
            import warnings

            from owlctl.deploy.kernels.linear import sparsify

            with warnings.catch_warnings():  # the fallback is reported below, once, in owlctl's words
                warnings.filterwarnings("ignore", message=".*falling back", category=UserWarning)
                sparse = sparsify(model, cfg.sparse_kernel, threads=threads)
            if sparse.get("fallback"):
                log(f"torch-sparse: owlctl's C kernels are not available ({sparse['fallback']}); using "
                    f"{sparse['kernel']} instead")
        load_s = time.perf_counter() - t0
        ids, templated = prompt_ids(tok, cfg.prompt, cfg.raw)
        if not ids:
            raise InputError("the prompt tokenizes to no tokens", hint="give a longer --prompt")
        pieces = TextPieces(tok)
        res = Generated()
        run(model, torch.tensor([ids]), cfg.max_new_tokens, eos_ids(model, tok),
            Sampler(cfg.temperature, cfg.top_p, cfg.seed), lambda i: _emit(on_text, pieces.push(i)), res)
        _emit(on_text, pieces.finish())
    finally:
        torch.set_num_threads(old_threads)
    decode_s = sum(res.step_s)
    timings = {"load_s": round(load_s, 4), "prefill_s": res.prefill_s, "prefill_tokens": len(ids),
               "prefill_tokens_per_s": len(ids) / res.prefill_s if res.prefill_s > 0 else None,
               "decode_s": decode_s, "decode_steps": len(res.step_s),
               "decode_tokens_per_s": len(res.step_s) / decode_s if decode_s > 0 else None}
    return {**header("generate", "generate", info.as_dict(), {"load": round(load_s, 3),
                                                              "total": round(time.perf_counter() - t0, 3)}),
            "backend": cfg.backend, "kernel": sparse["kernel"] if sparse else None,
            "isa": sparse.get("isa") if sparse else None, "threads": threads,
            "sparse": sparse, "text": pieces.text, "prompt": {"text": cfg.prompt, "tokens": len(ids),
                                                            "chat_template": templated},
            "generated_tokens": len(res.ids), "token_ids": res.ids, "stop": res.stop,
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                         "seed": cfg.seed if cfg.temperature > 0 else None,
                         "mode": "greedy" if cfg.temperature <= 0 else "sample"},
            "max_new_tokens": cfg.max_new_tokens, "timings": timings}


def _emit(on_text: Callable[[str], None], piece: str) -> None:
    if piece:
        on_text(piece)
