"""Zero-shot accuracy through the stock EleutherAI lm-evaluation-harness (optional: ``owlctl[eval]``).

The loaded model is wrapped in lm-eval's HFLM and scored with ``lm_eval.simple_evaluate``, 0-shot. The
harness's "acc" is the argmax of the SUMMED continuation log-likelihood ("acc_norm": normalised by byte
length). The OWL reference scored the same seven tasks with its own replay pipeline and the MEAN per-token
log-likelihood (SPEC 7.4), so these numbers are not comparable with the paper's table; compare models with
each other under this harness instead.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata as md
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from owlctl.errors import InputError

__all__ = ["PAPER_TASKS", "zeroshot", "lm_eval_version", "require_lm_eval", "task_manager"]

# The seven tasks of the OWL / Wanda papers (SPEC 7.4).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Stderr of "acc"/"acc_norm" (means) is closed-form; bootstrap resampling only serves other metrics (f1, mcc)
# of user tasks, where 1000 resamples give a stderr good to a few percent of itself in seconds.
BOOTSTRAP_ITERS = 1000
_INSTALL_HINT = "pip install 'owlctl[eval]'   (the EleutherAI lm-evaluation-harness, lm-eval>=0.4.5)"


def lm_eval_version() -> str | None:
    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return None


def require_lm_eval() -> Any:
    """Import lm_eval or raise InputError with the install hint."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise InputError(f"zero-shot evaluation needs the lm-eval package, which is not installed ({e})",
                         hint=_INSTALL_HINT) from None
    return lm_eval


_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def _manager(task_dir: str | None, include_defaults: bool) -> Any:
    key = (task_dir, include_defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=task_dir, include_defaults=include_defaults)
    return _MANAGERS[key]


def task_manager(tasks: Sequence[str], task_dir: str | Path | None = None) -> Any:
    """A TaskManager that knows every name in ``tasks``; unknown names raise InputError with close matches.

    Indexing lm-eval's thousands of built-in task files takes ~10 s, so when every requested task lives in
    ``task_dir`` only that folder is indexed, and an index is built once per process.
    """
    require_lm_eval()
    if task_dir is not None:
        if not Path(task_dir).is_dir():
            raise InputError(f"--task-dir {task_dir} is not a directory",
                             hint="point it at a folder of lm-eval task YAML files")
        local = _manager(str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = _manager(str(task_dir) if task_dir is not None else None, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        parts = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=5, cutoff=0.6)
            parts.append(f"{t!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        raise InputError("unknown lm-eval task " + "; ".join(parts),
                         hint="the paper's tasks are " + ",".join(PAPER_TASKS) + "; `lm-eval ls tasks` lists all, "
                              "and --task-dir DIR adds a folder of your own task YAML files")
    return tm


def zeroshot(model: Any, tok: Any, tasks: Sequence[str] = PAPER_TASKS, *, limit: int | float | None = None,
             task_dir: str | Path | None = None, batch_size: int = 1, show_progress: bool = True) -> dict:
    """0-shot accuracies of a loaded (model, tokenizer) on lm-eval tasks. The model must already be on the
    device to run on; ``show_progress`` False mutes the harness's own bars and prints. Returns {"harness",
    "lm_eval_version", "num_fewshot", "limit", "tasks": {name: {"acc", "acc_stderr", "acc_norm", ...,
    "samples", "version"}}, "mean_acc"}; "mean_acc" averages "acc" over the tasks that report it (the paper's
    "average" column, under this harness's scoring)."""
    if not tasks:
        raise InputError("--tasks is empty", hint="e.g. --tasks boolq,rte")
    if limit is not None and limit <= 0:
        raise InputError(f"--limit must be > 0, got {limit}")
    tm = task_manager(tasks, task_dir)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO/WARNING chatter; logged errors still show
    # What the harness prints goes to stderr (stdout carries owlctl's result only). Its tqdm bars pass
    # disable= explicitly, so TQDM_DISABLE cannot silence them: without progress, stderr is muted instead.
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        if not show_progress:
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=tm,
                                      log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    out: dict[str, dict] = {}
    for name, metrics in (res or {}).get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[metric] = float(value) if value == value else None  # NaN (no stderr) -> null
        samples = (res.get("n-samples") or {}).get(name) or {}
        row["samples"] = samples.get("effective")
        row["version"] = (res.get("versions") or {}).get(name)
        out[name] = row
    accs = [r["acc"] for r in out.values() if isinstance(r.get("acc"), float)]
    return {"harness": "lm-eval simple_evaluate (HFLM, 0-shot, summed log-likelihood)",
            "lm_eval_version": lm_eval_version(), "num_fewshot": 0, "limit": limit, "tasks": out,
            "mean_acc": sum(accs) / len(accs) if accs else None}
