"""`owlctl eval`: perplexity with the reference protocol, a sparsity audit, and optional zero-shot accuracy.

    evaluate(EvalConfig(model=...))            loads the model (and --compare's), returns one owlctl.eval/1 doc
    evaluate_loaded(model, tok, data=...)      the same on a model already in memory (e.g. just pruned)
    audit_sparsity(model, records)             realised zeros per block / Linear vs the recorded allocation

Perplexity follows SPEC 7.1 exactly (owlctl/engine/perplexity.py) with ``bos="never"``; ``"always"`` gives
every window its own BOS, ``"auto"`` (the default) picks ``always`` for tokenizers that add a BOS to every
sequence. C4 follows SPEC 7.2: the first 256 windows. ``evaluate`` refuses evaluation text that overlaps the
calibration text a checkpoint records (check_calibration_overlap).
"""

from __future__ import annotations

import gc
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from owlctl.engine.zeroshot import PAPER_TASKS
from owlctl.errors import InputError, ModelError
from owlctl.options import BOS, ComputeOptions, Split, arg, opt, parse_list
from owlctl.progress import interactive

__all__ = ["EvalConfig", "evaluate", "evaluate_loaded", "audit_sparsity", "eval_defaults", "token_streams",
           "check_calibration_overlap", "PAPER_TASKS", "C4_WINDOWS"]

SPLITS = ("test", "validation")  # never "calib": evaluating on calibration text would flatter the model
C4_WINDOWS = 256  # SparseGPT's C4 protocol (SPEC 7.2): 256 windows of the validation shard
DEFAULT_EVAL = {"data": ("wikitext2",), "seqlen": 2048}
BUILTIN_EVAL = {"data": ("builtin:wiki",), "seqlen": 512}
NO_ALLOCATION = "no allocation recorded"


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


def eval_defaults(model_id: str, data: Sequence[str] | None = None, seqlen: int | None = None,
                  context: int | None = None) -> tuple[tuple[str, ...], int]:
    """(data sources, seqlen) for a model id (a checkpoint reports the id it was pruned from); the default
    seqlen is capped at the model's ``context``."""
    from owlctl.engine.models import is_builtin

    base = BUILTIN_EVAL if is_builtin(model_id) else DEFAULT_EVAL
    if seqlen is None:
        seqlen = base["seqlen"] if context is None else min(base["seqlen"], context)
    return tuple(data) if data else base["data"], seqlen


def _expand_tasks(tasks: Sequence[str] | None) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    out: list[str] = []
    for t in tasks:
        for name in (PAPER_TASKS if t == "paper" else (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def _validate(cfg: EvalConfig) -> None:
    from owlctl.options import Bos, Dtype, check_choice, check_device

    check_device(cfg.device)
    check_choice("--dtype", cfg.dtype, Dtype)
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


# ------------------------------------------------------------------------------------------- audit
def _rounding_slack(in_features: Sequence[int]) -> float:
    """Largest gap between allocated and realised sparsity that rounding explains: Wanda floors the pruned
    count per row, so a row loses up to one weight less than C_in * s; other groupings lose less."""
    return 1.0 / min(in_features) + 1e-9


def audit_sparsity(model: Any, records: dict | None = None) -> dict:
    """Realised sparsity (exact zeros of the live weights) per block and per prunable Linear, checked against
    the allocation in ``records`` ({"allocation": doc|None, "report": doc|None}, as read_checkpoint_records
    returns). A block is a mismatch when:
      - unstructured, with the prune report's expected counts: its zeros != the expected pruned count plus
        the zeros the weights already had (report zeros - report pruned);
      - unstructured, without them: |realised - allocated| > 1/min(C_in) + 1e-9 (per-row rounding slack);
      - N:M (n_keep kept per group of m): any group of m inputs keeps more than n_keep non-zeros, or its
        zeros differ as above (rows x C_in/m x (m - n_keep) expected).
    Zeros the weights had before pruning are reported apart (``preexisting_zeros``, from the prune report;
    null without one): ``realised`` counts every exact zero, ``pruned`` the mask positions (what the
    allocation asked for), ``preexisting`` the zeros found before pruning, some of which a mask may select.
    Returns {"status": "ok" | "mismatch" | "no allocation recorded", "realised_sparsity", "allocated_sparsity",
    "pruned_sparsity", "preexisting_sparsity", "pattern", "allocator", "blocks": [...], "mismatches": [...]}."""
    import torch

    from owlctl.families import resolve

    layout = resolve(model)
    records = records or {}
    alloc, report = records.get("allocation"), records.get("report")
    mismatches: list[dict] = []
    pattern = alloc["pattern"] if alloc else None
    nm_m = int(pattern["m"]) if pattern and pattern.get("kind") == "nm" else None
    alloc_blocks = alloc["blocks"] if alloc else None
    if alloc_blocks is not None and len(alloc_blocks) != layout.num_blocks:
        mismatches.append({"block": None, "name": None, "linear": None,
                           "reason": f"the allocation has {len(alloc_blocks)} blocks but the model has "
                                     f"{layout.num_blocks}"})
        alloc_blocks = None
    rep_blocks = {b["index"]: {r["name"]: r for r in b.get("linears", [])} for b in (report or {}).get("blocks", [])}
    rows: list[dict] = []
    with torch.inference_mode():
        for i in range(layout.num_blocks):
            lins = layout.linears(i)
            ab = alloc_blocks[i] if alloc_blocks is not None else None
            n_keep = int(ab["n_keep"]) if (ab is not None and nm_m is not None) else None
            counts = []
            for lin in lins.values():
                w = lin.weight
                zeros = (w == 0).sum()
                if n_keep is not None and w.shape[1] % nm_m == 0:
                    groups = (w != 0).reshape(w.shape[0], w.shape[1] // nm_m, nm_m).sum(-1)
                    over = (groups > n_keep).sum()
                else:
                    over = torch.zeros((), dtype=zeros.dtype, device=zeros.device)
                counts.append(torch.stack([zeros, over]))
            values = torch.stack(counts).cpu().tolist()  # one sync per block
            rows.append(_audit_block(i, layout.block_name(i), lins, values, ab, nm_m, rep_blocks.get(i),
                                     mismatches))
    numel = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    allocated = None
    if alloc_blocks is not None:
        allocated = sum(r["allocated"] * r["numel"] for r in rows) / numel if numel else 0.0
    status = NO_ALLOCATION if alloc is None else ("mismatch" if mismatches else "ok")

    def total(key: str) -> int | None:
        vals = [r[key] for r in rows]
        return None if any(v is None for v in vals) else sum(vals)

    pre, pruned = total("preexisting_zeros"), total("pruned")
    return {"status": status, "realised_sparsity": zeros / numel if numel else 0.0, "allocated_sparsity": allocated,
            "pruned_sparsity": None if pruned is None or not numel else pruned / numel,
            "preexisting_sparsity": None if pre is None or not numel else pre / numel,
            "numel": numel, "zeros": zeros, "preexisting_zeros": pre, "pruned": pruned, "pattern": pattern,
            "allocator": ((alloc or {}).get("params") or {}).get("allocator"),
            "expected_counts": report is not None, "blocks": rows, "mismatches": mismatches}


def _audit_block(i: int, name: str, lins: dict, values: list, ab: dict | None, nm_m: int | None,
                 rep: dict | None, mismatches: list[dict]) -> dict:
    lin_rows = []
    for (lname, lin), (zeros, over) in zip(lins.items(), values):
        out_f, in_f = lin.weight.shape
        expected = None
        r = (rep or {}).get(lname)
        same = r is not None and r.get("numel") == out_f * in_f
        if ab is not None and same:
            natural = max(0, int(r["zeros"]) - int(r["pruned"]))  # zeros the mask did not make
            planned = int(r["expected_pruned"]) if int(r["expected_pruned"]) >= 0 else int(r["pruned"])
            expected = planned + natural
        pre = int(r["preexisting_zeros"]) if same and r.get("preexisting_zeros") is not None else None
        pruned = int(r["pruned"]) if same and ab is not None and r.get("pruned") is not None else None
        lin_rows.append({"name": lname, "shape": [out_f, in_f], "numel": out_f * in_f, "zeros": int(zeros),
                         "sparsity": zeros / (out_f * in_f), "preexisting_zeros": pre, "pruned": pruned,
                         "expected_zeros": expected,
                         "nm_violations": int(over) if nm_m is not None and ab is not None else None})
    numel = sum(r["numel"] for r in lin_rows)
    zeros = sum(r["zeros"] for r in lin_rows)

    def total(key: str) -> int | None:
        vals = [r[key] for r in lin_rows]
        return None if any(v is None for v in vals) else sum(vals)

    pre_b, pruned_b = total("preexisting_zeros"), total("pruned")
    row: dict[str, Any] = {"index": i, "name": name, "numel": numel, "zeros": zeros,
                           "realised": zeros / numel if numel else 0.0,
                           "pruned_fraction": None if pruned_b is None or not numel else pruned_b / numel,
                           "preexisting": None if pre_b is None or not numel else pre_b / numel,
                           "preexisting_zeros": pre_b, "pruned": pruned_b, "allocated": None, "n_keep": None,
                           "expected_zeros": None, "check": None, "ok": None, "linears": lin_rows}
    if ab is None:
        return row
    allocated = float(ab["sparsity"]) if nm_m is None else 1.0 - int(ab["n_keep"]) / nm_m
    row.update(allocated=allocated, n_keep=ab.get("n_keep"))
    problems: list[dict] = []
    if all(r["expected_zeros"] is not None for r in lin_rows):
        row["check"] = "report counts"
        row["expected_zeros"] = sum(r["expected_zeros"] for r in lin_rows)
        for r in lin_rows:
            if r["zeros"] != r["expected_zeros"]:
                problems.append({"linear": r["name"], "reason": f"{r['zeros']} zeros, expected "
                                 f"{r['expected_zeros']} ({r['zeros'] - r['expected_zeros']:+d})"})
    else:
        slack = _rounding_slack([r["shape"][1] for r in lin_rows])
        row["check"] = f"|realised - allocated| <= {slack:.2e}"
        if abs(row["realised"] - allocated) > slack:
            problems.append({"linear": None, "reason": f"realised {row['realised']:.6f} vs allocated "
                             f"{allocated:.6f} (diff {row['realised'] - allocated:+.6f}, slack {slack:.2e})"})
    if nm_m is not None:
        row["check"] += f"; every group of {nm_m} keeps <= {ab['n_keep']}"
        for r in lin_rows:
            if r["shape"][1] % nm_m:
                problems.append({"linear": r["name"], "reason": f"{r['shape'][1]} inputs not divisible by M={nm_m}"})
            elif r["nm_violations"]:
                problems.append({"linear": r["name"], "reason": f"{r['nm_violations']} groups of {nm_m} keep more "
                                 f"than {ab['n_keep']} weights"})
    row["ok"] = not problems
    for p in problems:
        mismatches.append({"block": i, "name": name, "realised": row["realised"], "allocated": allocated, **p})
    return row


# -------------------------------------------------------------------------------------- perplexity
def token_streams(data: Sequence[str], split: str, tok: Any, bos: str = "auto") -> dict[str, Any]:
    """{source: 1-D token ids} for each evaluation source, each tokenised once (cached on disk); ``bos`` as in
    evaluate_loaded (the streams of "always" carry no special tokens: the windows get the BOS)."""
    from owlctl.engine.data import resolve_bos, token_stream

    if tok is None:
        raise ModelError("the model has no tokenizer, so its perplexity cannot be measured on text",
                         hint="save a tokenizer beside the weights (tokenizer.json / tokenizer_config.json)")
    bos = resolve_bos(tok, bos)
    return {source: token_stream(source, split, tok, bos) for source in dict.fromkeys(data)}


def calibration_records(records: dict | None) -> list[dict]:
    """The calibration blocks a checkpoint records: its prune calibration and its allocation's profile's."""
    out = []
    rep = (records or {}).get("report") or {}
    alloc = (records or {}).get("allocation") or {}
    for cal in (rep.get("calibration"), (alloc.get("profile") or {}).get("calibration")):
        if isinstance(cal, dict) and cal not in out:
            out.append(cal)
    return out


def check_calibration_overlap(calibrations: Sequence[dict], data: Sequence[str], split: str) -> list[dict]:
    """Refuse (DataError) evaluation text that overlaps recorded calibration text: any paragraph of the
    evaluation split whose hash is among the calibration fingerprint's (engine.data.text_fingerprint; this
    catches the same file, a copy, a folder and one of its files, ...). Returns what was checked."""
    from owlctl.engine.data import fingerprint_overlap, overlap_texts
    from owlctl.errors import DataError

    checks = []
    cals = [c for c in calibrations if (c.get("fingerprint") or {}).get("paragraphs")]
    if not cals:
        return checks
    for source in dict.fromkeys(data):
        docs = overlap_texts(source, split)
        for cal in cals:
            checked, hits, examples = fingerprint_overlap(cal["fingerprint"], docs)
            checks.append({"source": source, "split": split, "calibration_source": cal.get("source"),
                           "paragraphs_checked": checked, "overlapping": hits})
            if hits:
                rule = (cal.get("split") or {}).get("rule", "?")
                raise DataError(
                    f"the {split} split of {source} overlaps the calibration text: {hits} of its {checked} "
                    f"checked paragraphs are calibration paragraphs of {cal.get('source')} (split rule: {rule}), "
                    f"e.g. {examples[0]!r}",
                    hint="evaluate on text the model was not calibrated on: another --data, or the "
                         "validation / test split of the calibration source itself (disjoint by construction)")
    return checks


def _windows_cap(source: str, max_windows: int | None) -> int | None:
    if source == "c4":
        return C4_WINDOWS if max_windows is None else min(max_windows, C4_WINDOWS)
    return max_windows


def _windows_sha256(ids: Any, seqlen: int, cap: int | None, bos_id: int | None = None) -> str:
    import torch

    from owlctl.engine.perplexity import windows

    wins = windows(ids, seqlen, cap, bos_id)
    return hashlib.sha256(wins.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _check_seqlen(model: Any, seqlen: int) -> None:
    from owlctl.engine.perplexity import max_positions

    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"--seqlen {seqlen} is longer than the model's {limit} positions "
                         "(max_position_embeddings)", hint=f"use --seqlen {limit} or less")


def evaluate_loaded(model: Any, tok: Any, *, data: Sequence[str] = ("builtin:wiki",), split: str = "test",
                    seqlen: int = 2048, batch_size: int = 1, max_windows: int | None = None, ppl: bool = True,
                    tasks: Sequence[str] | None = None, limit: int | None = None, task_dir: str | None = None,
                    device: str = "cpu", records: dict | None = None, streams: dict | None = None,
                    progress: Any = None, bos: str = "auto") -> dict:
    """Evaluate a model already in memory: {"perplexity": {source: {...}}, "audit": {...}, "zeroshot": {...} |
    None, "seconds": {...}}. ``records`` = {"allocation": doc, "report": doc} for the audit (None: "no
    allocation recorded"); ``streams`` = {source: token ids} to reuse (e.g. for an identical comparison), made
    by token_streams with the same ``bos`` (auto | always | never: a BOS per window, see engine/data.py).
    The model is moved to ``device`` for the evaluation and back to where it was afterwards. ``progress``
    None also mutes lm-eval's own progress output."""
    from owlctl.engine.models import resolve_device
    from owlctl.engine.perplexity import perplexity, windows

    from owlctl.engine.data import resolve_bos

    device = resolve_device(device)
    data = (data,) if isinstance(data, str) else tuple(data)
    bos = resolve_bos(tok, bos) if ppl else bos
    bos_id = int(tok.bos_token_id) if ppl and bos == "always" else None
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if ppl:
        _check_seqlen(model, seqlen)
    tasks = _expand_tasks(tasks)
    if tasks:
        from owlctl.engine.zeroshot import task_manager

        task_manager(tasks, task_dir)  # unknown tasks fail here, before any forward pass (the index is cached)
    seconds: dict[str, float] = {}
    if ppl and streams is None:
        t0 = time.perf_counter()
        streams = token_streams(data, split, tok, bos)
        seconds["tokenize"] = round(time.perf_counter() - t0, 3)
    if ppl:
        for source, ids in streams.items():
            windows(ids, seqlen, _windows_cap(source, max_windows), bos_id)  # too-short corpus: fail before work
    t0 = time.perf_counter()
    audit = audit_sparsity(model, records)
    seconds["audit"] = round(time.perf_counter() - t0, 3)
    home = next(model.parameters()).device
    moved = not _same_device(home, device)
    if moved:
        model.to(device)
    try:
        results: dict[str, dict] = {}
        t0 = time.perf_counter()
        for source, ids in (streams.items() if ppl else ()):
            cap = _windows_cap(source, max_windows)
            res = perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=cap, device=device,
                             progress=progress, description=f"ppl {source}", bos_id=bos_id)
            results[source] = {"source": source, "split": split, **res, "stream_tokens": int(ids.numel()),
                               "windows_sha256": _windows_sha256(ids, seqlen, cap, bos_id)}
        if ppl:
            seconds["perplexity"] = round(time.perf_counter() - t0, 3)
        zs = None
        if tasks:
            from owlctl.engine.zeroshot import zeroshot

            t0 = time.perf_counter()
            zs = zeroshot(model, tok, tasks, limit=limit, task_dir=task_dir, batch_size=batch_size,
                          show_progress=interactive(progress))  # lm-eval's own bars only on a terminal
            seconds["zeroshot"] = round(time.perf_counter() - t0, 3)
    finally:
        if moved:
            model.to(home)
    return {"perplexity": results, "audit": audit, "zeroshot": zs, "seconds": seconds}


# ---------------------------------------------------------------------------------------- evaluate
def _load(spec: str, dtype: str) -> tuple[Any, Any, Any, dict]:
    from owlctl.engine.models import load_model
    from owlctl.formats.checkpoint import read_checkpoint_records

    model, tok, info = load_model(spec, dtype)
    records = read_checkpoint_records(Path(info.path))
    desc = {"id": info.id, "spec": spec, "path": info.path, "model_type": info.model_type,
            "content_sha256": info.content_sha256, "source": records.get("source")}
    return model, tok, records, desc


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


def _same_device(a: Any, b: Any) -> bool:
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device()
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return True


def evaluate(cfg: EvalConfig, progress: Any = None) -> dict:
    """Load ``cfg.model`` (and ``cfg.compare``), evaluate, and return one owlctl.eval/1 document.
    The window length, the data and the zero-shot tasks are checked before any weight is read."""
    from owlctl.engine.models import load_tokenizer, local_dir, model_config, origin_id, resolve_device
    from owlctl.formats._io import header
    from owlctl.ops.checks import check_seqlen, context_length
    from owlctl.ops.common import now

    _validate(cfg)
    tasks = _expand_tasks(cfg.tasks)
    if tasks:
        from owlctl.engine.zeroshot import task_manager

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
        from owlctl.engine.perplexity import windows
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
    model, tok, records, desc = _load(cfg.model, cfg.dtype)
    t_load = time.perf_counter() - t_start
    kw = dict(split=cfg.split, seqlen=seqlen, batch_size=cfg.batch_size, max_windows=cfg.max_windows,
              ppl=cfg.ppl, tasks=tasks, limit=cfg.limit, task_dir=cfg.task_dir, device=device, streams=streams,
              progress=progress, bos=bos or cfg.bos)
    res = evaluate_loaded(model, tok, data=data, records=records, **kw)
    compare = None
    if cfg.compare is not None:
        del model
        gc.collect()
        t0 = time.perf_counter()
        other, other_tok, other_records, other_desc = _load(cfg.compare, cfg.dtype)
        t_other = round(time.perf_counter() - t0, 3)
        other_res = evaluate_loaded(other, other_tok, data=data, records=other_records, **kw)
        other_res["seconds"]["load"] = t_other
        ratio = {s: (other_res["perplexity"][s]["ppl"] / r["ppl"] if r["ppl"] and other_res["perplexity"][s]["ppl"]
                     else None) for s, r in res["perplexity"].items()}
        compare = {"model": other_desc, **other_res, "ratio": ratio,
                   "identical_windows": all(other_res["perplexity"][s]["windows_sha256"] == r["windows_sha256"]
                                            for s, r in res["perplexity"].items())}
        del other
        gc.collect()
    seconds = {"load": round(t_load, 3), **res["seconds"], "total": round(time.perf_counter() - t_start, 3)}
    return {**header("eval"), "created": now(), "model": desc,
            "settings": {"data": list(data), "split": cfg.split, "seqlen": seqlen, "batch_size": cfg.batch_size,
                         "max_windows": cfg.max_windows, "device": device, "dtype": cfg.dtype,
                         "bos": bos, "bos_requested": cfg.bos,
                         "protocol": ("reference (SPEC 7.1): floor(n/seqlen) non-overlapping windows, remainder "
                                      "dropped, fp32 cross-entropy, ppl = exp(mean window CE)" if bos != "always"
                                      else "SPEC 7.1 with a BOS per window: [BOS] + seqlen-1 stream tokens, "
                                           "floor(n/(seqlen-1)) windows, remainder dropped, fp32 cross-entropy, "
                                           "ppl = exp(mean window CE)"),
                         "calibration_overlap": overlap},
            "perplexity": res["perplexity"], "audit": res["audit"], "zeroshot": res["zeroshot"],
            "compare": compare, "seconds": seconds}
