"""`owlctl eval`: perplexity with the reference protocol, a sparsity audit, and optional zero-shot accuracy.

    evaluate(EvalConfig(model=...))            loads the model (and --compare's), returns one owlctl.eval doc
    evaluate_loaded(model, tok, data=...)    the same on a model already in memory (e.g. just pruned)
    audit_sparsity(model, records)             realised zeros per block / Linear vs the recorded allocation

Perplexity follows SPEC 7.1 exactly (owlctl/engine/perplexity.py) with ``bos="never"``; ``"always"`` gives
every window its own BOS, ``"auto"`` (the default) picks ``always`` for tokenizers that add a BOS to every
sequence. C4 follows SPEC 7.2: the first 256 windows. ``evaluate`` refuses evaluation text that overlaps the
calibration text a checkpoint records (check_calibration_overlap).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.evaluation.audit import audit_sparsity
from owlctl.engine.evaluation.defaults import eval_defaults
from owlctl.engine.evaluation.loaded import _expand_tasks, evaluate_host, evaluate_loaded
from owlctl.engine.evaluation.texts import (
    C4_WINDOWS,
    SPLITS,
    _windows_cap,
    calibration_records,
    check_calibration_overlap,
    token_streams,
)
from owlctl.engine.evaluation.zeroshot import PAPER_TASKS
from owlctl.errors import InputError, ModelError
from owlctl.options import BOS, ComputeOptions, Split, arg, opt, parse_list

__all__ = ["EvalConfig", "evaluate", "evaluate_loaded", "evaluate_host", "audit_sparsity", "eval_defaults", "token_streams",
           "check_calibration_overlap", "PAPER_TASKS", "C4_WINDOWS"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ComputeOptions):
    """``data`` None: builtin:wiki for the built-in model and checkpoints pruned from it, else wikitext2.
    ``seqlen`` None: 512 for those, else 2048 (the reference). ``tasks`` None: no zero-shot; ("paper",) is
    the paper's seven (``zeroshot=True`` is short for it). ``compare``: a second model evaluated on the
    identical token windows. ``bos``: auto | always | never (a BOS per window; never = the reference
    protocol)."""

    model: str = arg("Checkpoint directory, HF hub id, local model directory, or a built-in model.")()
    data: tuple[str, ...] | None = opt(
        "--data", help="builtin:wiki | wikitext2 | c4 | a local .txt/.jsonl file or folder; repeatable (default: "
        "builtin:wiki for built-in models, wikitext2 otherwise).", multiple=True, parse=parse_list,
        cli_type=str)(None)
    split: str = opt("--split", help="Held-out split (never the calibration text).", choices=Split)("test")
    seqlen: int | None = opt("--seqlen", help="Tokens per evaluation window (default: 2048, built-in: 512).",
                             min=2)(None)
    batch_size: int = opt("--batch-size", help="Windows per forward pass (and lm-eval batch size); the result "
                          "does not change.", min=1)(1)
    max_windows: int | None = opt("--max-windows", help="Score only the first N windows (quick checks; c4 is "
                                  "always capped at 256).", min=1)(None)
    ppl: bool = opt("--ppl/--no-ppl", help="Measure perplexity (--no-ppl: zero-shot and audit only).")(True)
    zeroshot: bool = opt("--zeroshot", help="Run the paper's seven zero-shot tasks (boolq, rte, hellaswag, "
                         "winogrande, arc_easy, arc_challenge, openbookqa).")(False)
    tasks: tuple[str, ...] | None = opt("--tasks", help="Comma-separated lm-eval task names ('paper' = the "
                                        "seven); implies zero-shot.", multiple=True, parse=parse_list,
                                        cli_type=str)(None)
    limit: int | None = opt("--limit", help="At most N examples per zero-shot task (quick checks only).",
                            min=1)(None)
    task_dir: str | None = opt("--task-dir", help="A folder of extra lm-eval task YAML files.")(None)
    compare: str | None = opt("--compare", help="A second model evaluated on the identical token windows; "
                              "reports other/this.")(None)
    bos: str = BOS("auto")

    def __post_init__(self) -> None:
        if self.zeroshot and self.tasks is None:
            object.__setattr__(self, "tasks", ("paper",))


def _validate(cfg: EvalConfig) -> None:
    from owlctl.options import Bos, check_choice, check_compute

    check_compute(cfg)  # --device, --dtype, --offload, --offload-activations
    check_choice("--bos", cfg.bos, Bos)
    if cfg.split not in SPLITS:
        hint = "calibration text is never used for evaluation" if cfg.split == "calib" else None
        raise InputError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}", hint=hint)
    if cfg.seqlen is not None and cfg.seqlen < 2:
        raise InputError(f"--seqlen must be >= 2, got {cfg.seqlen}")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.max_windows is not None and cfg.max_windows < 1:
        raise InputError(f"--max-windows must be >= 1, got {cfg.max_windows}")
    if cfg.limit is not None and cfg.limit < 1:
        raise InputError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.tasks is not None and not [t for t in cfg.tasks if t]:
        raise InputError("--tasks is empty", hint="e.g. --tasks boolq,rte, or --tasks paper for all seven")
    if not cfg.ppl and not cfg.tasks:
        raise InputError("--no-ppl leaves nothing to compute but the audit; add --tasks, or drop --no-ppl")


# ---------------------------------------------------------------------------------------- evaluate
def _load(spec: str, dtype: str, offload: str) -> tuple[Any, Any, Any, dict]:
    """(host, tokenizer, checkpoint records, model reference): streamed or in memory by ``offload``; a model
    of a family owlctl cannot walk is loaded into memory (still evaluable, only the audit is empty)."""
    from owlctl.engine.models import load_model, open_model
    from owlctl.engine.models.hosts import InMemory
    from owlctl.formats.checkpoint import read_checkpoint_records

    try:
        host, tok, info = open_model(spec, dtype, offload)
    except ModelError as e:
        if "not a registered family" not in str(e):
            raise
        model, tok, info = load_model(spec, dtype)
        host = InMemory(model)
    try:
        ref = info.as_dict(host.layout.family.name, host.layout.num_blocks)
    except ModelError:
        ref = info.as_dict()
    records = read_checkpoint_records(Path(info.path))
    return host, tok, records, ref


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Two tokenizers map text to the same ids (same vocabulary and the same special-token setup)."""
    if a is None or b is None:
        return False
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def _check_compare_tokenizer(cfg: EvalConfig, tok: Any) -> None:
    from transformers import AutoTokenizer

    from owlctl.engine.models import local_dir

    path, _ = local_dir(cfg.compare)
    try:
        other = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        other = None
    if not _same_tokenizer(tok, other):
        raise InputError(f"{cfg.compare} does not use the same tokenizer as {cfg.model}, so the same token ids "
                         "would be different text for it",
                         hint="--compare needs two models of one family, e.g. a dense model and its pruned checkpoint")


def evaluate(cfg: EvalConfig, progress: Any = None) -> dict:
    """Load ``cfg.model`` (and ``cfg.compare``), evaluate, and return one owlctl.eval document.
    The window length, the data and the zero-shot tasks are checked before any weight is read."""
    from owlctl.engine.distributed import launched, session

    _validate(cfg)
    if launched() is not None and cfg.tasks:
        raise InputError("zero-shot tasks run on one process; several processes (torchrun, accelerate launch) "
                         "split the perplexity windows only", hint="run --tasks without the launcher, or drop --tasks")
    with session("eval", cfg) as world:
        doc = _evaluate(cfg, progress if world is None or world.main else None)
        if world is not None:
            doc["seconds"]["collectives"] = round(world.collective_s, 3)
        return doc


def _evaluate(cfg: EvalConfig, progress: Any) -> dict:
    from owlctl.engine.models import load_tokenizer, local_dir, model_config, origin_id, resolve_device
    from owlctl.formats._io import header
    from owlctl.ops.checks import check_seqlen, context_length

    tasks = _expand_tasks(cfg.tasks)
    if tasks:
        from owlctl.engine.evaluation.zeroshot import task_manager

        task_manager(tasks, cfg.task_dir)  # missing lm-eval / unknown task: fail before loading the model
    t_start = time.perf_counter()
    config, local = model_config(cfg.model)
    data, seqlen = eval_defaults(origin_id(cfg.model, local), cfg.data, cfg.seqlen, context_length(config))
    if cfg.ppl:
        check_seqlen(seqlen, config, cfg.model)  # before tokenising (wikitext2 / c4 may have to be downloaded)
    device = resolve_device(cfg.device)
    streams, bos = None, None
    overlap: list[dict] = []
    if cfg.ppl:
        from owlctl.engine.evaluation.perplexity import windows
        from owlctl.formats.checkpoint import read_checkpoint_records
        from owlctl.ops.common import resolve_bos

        tok0 = load_tokenizer(local_dir(cfg.model)[0])
        if cfg.compare is not None:
            _check_compare_tokenizer(cfg, tok0)  # before the first (possibly long) evaluation
        bos = resolve_bos(tok0, cfg.bos)
        cals = calibration_records(read_checkpoint_records(local_dir(cfg.model)[0]))
        if cfg.compare is not None:
            cals += calibration_records(read_checkpoint_records(local_dir(cfg.compare)[0]))
        overlap = check_calibration_overlap(cals, data, cfg.split)  # refuses before any forward pass
        streams = token_streams(data, cfg.split, tok0, bos)
        for source, ids in streams.items():  # too-short corpus: fail before the weights are read
            windows(ids, seqlen, _windows_cap(source, cfg.max_windows),
                    bos_id=tok0.bos_token_id if bos == "always" else None)
    host, tok, records, desc = _load(cfg.model, cfg.dtype, cfg.offload)
    t_load = time.perf_counter() - t_start
    kw = dict(split=cfg.split, seqlen=seqlen, batch_size=cfg.batch_size, max_windows=cfg.max_windows,
              ppl=cfg.ppl, tasks=tasks, limit=cfg.limit, task_dir=cfg.task_dir, device=device, streams=streams,
              progress=progress, bos=bos or cfg.bos, activations=cfg.offload_activations)
    try:
        res = evaluate_host(host, tok, data=data, records=records, **kw)
    finally:
        host.close()
    comparison = None
    if cfg.compare is not None:
        del host
        gc.collect()
        comparison = _comparison(cfg, data, kw, res)
    seconds = {"load": round(t_load, 3), **res["seconds"], "total": round(time.perf_counter() - t_start, 3)}
    settings = {"data": list(data), "split": cfg.split, "seqlen": seqlen, "batch_size": cfg.batch_size,
                "max_windows": cfg.max_windows, "device": device, "dtype": cfg.dtype, "bos": bos,
                "bos_requested": cfg.bos, "protocol": PROTOCOL[bos == "always"], "calibration_overlap": overlap}
    return {**header("eval", "eval", desc, seconds), "settings": settings, "perplexity": res["perplexity"],
            "audit": res["audit"], "zeroshot": res["zeroshot"], "comparison": comparison}


PROTOCOL = {False: "reference (SPEC 7.1): floor(n/seqlen) non-overlapping windows, remainder dropped, fp32 "
                   "cross-entropy, ppl = exp(mean window CE)",
            True: "SPEC 7.1 with a BOS per window: [BOS] + seqlen-1 stream tokens, floor(n/(seqlen-1)) windows, "
                  "remainder dropped, fp32 cross-entropy, ppl = exp(mean window CE)"}


def _comparison(cfg: EvalConfig, data: Any, kw: dict, res: dict) -> dict:
    """``--compare``: the second model on the identical token windows, and other/this per source."""
    t0 = time.perf_counter()
    other, other_tok, other_records, other_desc = _load(cfg.compare, cfg.dtype, cfg.offload)
    t_other = round(time.perf_counter() - t0, 3)
    try:
        other_res = evaluate_host(other, other_tok, data=data, records=other_records, **kw)
    finally:
        other.close()
    other_res["seconds"]["load"] = t_other
    del other
    gc.collect()
    ratio = {s: (other_res["perplexity"][s]["ppl"] / r["ppl"] if r["ppl"] and other_res["perplexity"][s]["ppl"]
                 else None) for s, r in res["perplexity"].items()}
    return {"model": other_desc, **other_res, "ratio": ratio,
            "identical_windows": all(other_res["perplexity"][s]["windows_sha256"] == r["windows_sha256"]
                                     for s, r in res["perplexity"].items())}
