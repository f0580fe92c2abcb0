"""`owlctl finetune`: LoRA on a pruned checkpoint that keeps every pruned weight at zero (SPEC 8, 14).

The recipe defaults follow the reference (r 8, alpha 16, dropout 0.05, q_proj + v_proj, lr 1e-4, AdamW, weight
decay 0, 5 warmup updates then linear decay, blocks of 1024 tokens, 128 sequences per update) with its bugs
fixed (SPEC 12.13): the data is the one asked for, the tokenizer is the checkpoint's, and gradient accumulation
counts every process (effective batch = batch_size x processes x accumulation). Runs under
``accelerate launch`` unchanged; only the main process writes.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import DataError, InputError, ModelError, OwlctlWarning
from owlctl.options import (DTYPE, FORCE, OUTPUT, FinetuneDevice, KeepSparsity, MixedPrecision, arg, opt)

KEEP_MODES = ("merge-mask", "masked-lora")
KNOWN_CORPORA = ("builtin:wiki", "c4", "wikitext2")
DEFAULT_BLOCK_SIZE = 1024  # the reference's block size, capped at the model's context
LARGE_MODEL_PARAMS = 1_000_000_000  # gradient checkpointing is on by default above this
DEFAULT_EVAL_WINDOWS = 128  # the reference's max_eval_samples
BUILTIN_EVAL_WINDOWS = 16  # what a 2-core CPU evaluates in seconds


class FinetuneWarning(OwlctlWarning):
    """Something the user should know that does not stop the run (the CLI prints it on stderr)."""


def _grad_norm(value: float) -> float | None:
    return value or None  # --max-grad-norm 0: no clipping


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    checkpoint: str | Path = arg("Checkpoint directory (from `owlctl prune` / `owlctl nm`).", cli_type=Path)()
    output: Path = OUTPUT(help="Directory to write (model or adapter).")
    keep_sparsity: str = opt("--keep-sparsity", help="merge-mask (merge, then re-apply the zero mask) | "
                             "masked-lora (train the update times the mask: the merge is exact).",
                             choices=KeepSparsity)("merge-mask")
    adapter_only: bool = opt("--adapter-only", help="Save only the unmerged peft adapter "
                             "(PeftModel.from_pretrained(base, DIR)).")(False)
    targets: str = opt("--targets", help="Linears to adapt: a comma list (q_proj,v_proj) or all-linear.")(
        "q_proj,v_proj")
    rank: int = opt("--rank", "-r", help="LoRA rank r.", min=1)(8)
    alpha: float = opt("--alpha", help="LoRA alpha; the update is scaled by alpha / r.")(16.0)
    dropout: float = opt("--dropout", help="Dropout on the adapter's input.", min=0.0)(0.05)
    lr: float = opt("--lr", help="Peak learning rate (AdamW).")(1e-4)
    weight_decay: float = opt("--weight-decay", help="AdamW weight decay.", min=0.0)(0.0)
    warmup_steps: int = opt("--warmup-steps", help="Linear warmup updates.", min=0)(5)
    max_grad_norm: float | None = opt("--max-grad-norm", help="Clip the gradient norm (0: no clipping).",
                                      min=0.0, parse=_grad_norm, cli_type=float)(1.0)
    block_size: int | None = opt("--block-size", help="Tokens per training/eval sequence (default: "
                                 "min(1024, the model's context)).", min=2)(None)
    batch_size: int = opt("--batch-size", help="Sequences per micro-batch on each process.", min=1)(2)
    effective_batch: int = opt("--effective-batch", help="Sequences per update over all processes (sets the "
                               "accumulation).", min=1)(128)
    steps: int | None = opt("--steps", help="Optimizer updates (default: one epoch of the data).", min=1)(None)
    epochs: float | None = opt("--epochs", help="Passes over the training data.")(None)
    data: str | None = opt("--data", help="builtin:wiki | c4 | wikitext2 | a local .txt/.jsonl file or folder "
                           "(default: builtin:wiki for built-in models, c4 otherwise).")(None)
    eval_windows: int | None = opt("--eval-windows", help="Validation windows before/after (default 128, "
                                   "built-in 16; 0: no eval).", min=0)(None)
    gradient_checkpointing: bool | None = opt(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in backward (default: on above 1B parameters).")(None)
    mixed_precision: str | None = opt("--mixed-precision", help="Default: as accelerate is configured.",
                                      choices=MixedPrecision)(None)
    device: str = opt("--device", help="auto | cpu | cuda (under accelerate launch the launcher places "
                      "processes).", choices=FinetuneDevice)("auto")
    dtype: str = DTYPE("auto")
    seed: int = opt("--seed", help="Seed for data order and adapter initialisation.")(0)
    force: bool = FORCE(False)

    @property
    def mode(self) -> str:
        return "adapter-only" if self.adapter_only else self.keep_sparsity


def _validate(cfg: FinetuneConfig) -> None:
    if cfg.keep_sparsity not in KEEP_MODES:
        raise InputError(f"unknown --keep-sparsity {cfg.keep_sparsity!r}", hint="use merge-mask or masked-lora")
    if cfg.adapter_only and cfg.keep_sparsity == "masked-lora":
        raise InputError("--adapter-only cannot keep a masked-lora adapter: peft would apply its delta dense",
                         hint="drop --adapter-only to save the merged sparse model, or use the default mode")
    if cfg.steps is not None and cfg.epochs is not None:
        raise InputError("give --steps or --epochs, not both")
    if cfg.steps is not None and cfg.steps < 1:
        raise InputError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise InputError(f"--epochs must be > 0, got {cfg.epochs}")
    checks = [(cfg.rank >= 1, f"--rank must be >= 1, got {cfg.rank}"),
              (cfg.alpha > 0, f"--alpha must be > 0, got {cfg.alpha}"),
              (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
              (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
              (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
              (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
              (cfg.block_size is None or cfg.block_size >= 2, f"--block-size must be >= 2, got {cfg.block_size}"),
              (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
              (cfg.effective_batch >= 1, f"--effective-batch must be >= 1, got {cfg.effective_batch}"),
              (cfg.eval_windows is None or cfg.eval_windows >= 0, "--eval-windows must be >= 0"),
              (cfg.max_grad_norm is None or cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
              (cfg.mixed_precision in (None, "no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16")]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {cfg.device!r}: finetune takes auto, cpu or cuda",
                         hint="pick GPUs with CUDA_VISIBLE_DEVICES or `accelerate launch --gpu_ids`")
    ck = Path(cfg.checkpoint).expanduser()
    if not ck.is_dir():
        raise InputError(f"checkpoint {ck} does not exist or is not a directory",
                         hint="pass a directory written by `owlctl prune` (or any Hugging Face model directory)")
    if not (ck / "config.json").is_file():
        raise InputError(f"{ck} is not a Hugging Face model directory (no config.json)")
    if Path(cfg.output).expanduser().resolve() == ck.resolve():
        raise InputError("the output would replace the input checkpoint", hint="choose another -o")


def _windows_for(source: str, tok: Any, block_size: int, n_eval: int) -> tuple[Any, Any, dict]:
    """(train windows, eval windows, description). Corpora evaluate on their validation split; a local file
    has none, so its last n_eval windows are held out from training."""
    from owlctl.engine.data import token_stream
    from owlctl.engine.lora import windows

    train_ids = token_stream(source, "calib", tok)
    if source in KNOWN_CORPORA:
        eval_w = windows(token_stream(source, "validation", tok), block_size, n_eval) if n_eval else None
        desc = {"train": f"{source} (calib split)", "eval": f"{source} (validation split)"}
    else:
        held = n_eval * block_size
        eval_w = windows(train_ids[-held:], block_size) if n_eval else None
        train_ids = train_ids[:-held] if held else train_ids
        desc = {"train": source, "eval": f"{source} (last {n_eval} windows, held out from training)"}
    return windows(train_ids, block_size), eval_w, desc


def _sparsity_report(layout: Any, prev: dict | None, model_dict: dict, before: dict, after: dict,
                     finetune: dict) -> dict:
    """The checkpoint report (owlctl.report/1). An owlctl checkpoint keeps its prune report as it was, so
    `owlctl eval` checks the finetuned weights against the prune-time counts; otherwise one is built that
    records the zeros found at load time as the pruned ones (``expected_pruned`` -1: not known)."""
    from owlctl.formats.checkpoint import report_doc

    prev_keys = {(b.get("index"), r.get("name")) for b in (prev or {}).get("blocks", []) for r in b.get("linears", [])}
    if prev is not None and prev_keys == set(after):
        report = copy.deepcopy(prev)
    else:
        blocks = []
        for i in range(layout.num_blocks):
            lins = [{"name": n, "shape": after[(i, n)][2], "numel": after[(i, n)][1], "pruned": before[(i, n)][0],
                     "zeros": after[(i, n)][0], "sparsity": after[(i, n)][0] / after[(i, n)][1],
                     "expected_pruned": -1} for n in layout.linear_names]
            numel, z = sum(r["numel"] for r in lins), sum(r["zeros"] for r in lins)
            blocks.append({"index": i, "name": layout.block_name(i), "numel": numel, "zeros": z,
                           "sparsity": z / numel, "target_sparsity": None, "n_keep": None, "linears": lins})
        report = report_doc(model_dict, "unknown", {"kind": "unstructured"}, blocks, {})
    report["finetune"] = finetune
    return report


def _batching(cfg: FinetuneConfig, world: int, warn: Any) -> tuple[int, int]:
    """(accumulation, effective batch): every process counts (the reference divided by the micro-batch only)."""
    per_update = cfg.batch_size * world
    grad_accum = max(1, cfg.effective_batch // per_update)
    effective = grad_accum * per_update
    if effective != cfg.effective_batch:
        warn(f"effective batch {cfg.effective_batch} is not a multiple of --batch-size {cfg.batch_size} x "
             f"{world} process(es); using {effective} sequences per update")
    return grad_accum, effective


def _load_checked(cfg: FinetuneConfig, ckpt: Path, records: dict, warn: Any) -> tuple:
    """Load the checkpoint and find everything that can be wrong before any training:
    (model, tokenizer, info, layout, targets, zero counts per prunable Linear)."""
    from owlctl.engine import lora
    from owlctl.engine.models import load_model
    from owlctl.families import resolve

    model, tok, info = load_model(str(ckpt), cfg.dtype)
    if tok is None:
        raise ModelError(f"{ckpt} has no tokenizer", hint="save the tokenizer into the checkpoint directory")
    layout = resolve(model)
    targets = lora.resolve_targets(layout, cfg.targets)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    block_size = cfg.block_size
    if block_size is None:  # as transformers' run_clm: min(1024, the model's context)
        block_size = min(DEFAULT_BLOCK_SIZE, max_pos or DEFAULT_BLOCK_SIZE)
        if block_size < DEFAULT_BLOCK_SIZE:
            warn(f"--block-size defaults to {block_size}, the model's context (max_position_embeddings)")
    elif max_pos is not None and block_size > max_pos:
        raise InputError(f"--block-size {block_size} exceeds the model's {max_pos} positions",
                         hint=f"use --block-size {max_pos} or less")
    counts = lora.zero_counts(layout)
    if sum(c[0] for c in counts.values()) == 0:
        if cfg.mode == "merge-mask" and all(records[k] is None for k in ("allocation", "report", "source")):
            raise InputError(f"{ckpt} has no zero weights and no owlctl records: there is no mask to re-apply",
                             hint="pass a pruned checkpoint (`owlctl prune ... -o DIR`), or --adapter-only")
        warn(f"{ckpt} has no zero weights in its prunable Linears: nothing to keep (training plain LoRA)")
    return model, tok, info, layout, targets, counts, block_size


def finetune(cfg: FinetuneConfig, progress: Any = None) -> dict:
    """LoRA-finetune a (pruned) checkpoint and save it without losing its zeros. Returns the summary
    (plus ``_model``, the saved model or PeftModel, and ``_main``, whether this is the main process)."""
    _validate(cfg)
    from owlctl.formats._io import check_not_input, check_output
    from owlctl.formats.checkpoint import read_checkpoint_records

    ckpt, output = Path(cfg.checkpoint).expanduser(), Path(cfg.output).expanduser()
    check_output(output, cfg.force, "dir")
    check_not_input(output, [ckpt])
    records = read_checkpoint_records(ckpt)
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise InputError(f"owlctl finetune needs {e.name}, which is not installed",
                         hint="pip install 'owlctl[finetune]'   (peft and accelerate)") from None
    from accelerate import PartialState

    from owlctl.engine.models import resolve_device

    if cfg.device == "cuda":
        resolve_device("cuda")
    state = PartialState(cpu=cfg.device == "cpu")
    from owlctl.ops.common import output_claim

    # only the main process writes, so only it claims the output (a lock; the temporary directory now)
    with output_claim(output if state.is_main_process else None, cfg.force, "dir", inputs=[ckpt]) as claim:
        return _finetune(cfg, ckpt, output, records, state, claim, progress)


def _finetune(cfg: FinetuneConfig, ckpt: Path, output: Path, records: dict, state: Any, claim: Any,
              progress: Any) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    from owlctl.engine import lora
    from owlctl.engine.models import is_builtin
    from owlctl.ops.common import peak_rss_mb

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        if state.is_main_process:
            warnings.warn(msg, FinetuneWarning, stacklevel=3)

    world = state.num_processes
    grad_accum, effective = _batching(cfg, world, warn)
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_plugin=GradientAccumulationPlugin(
                                  num_steps=grad_accum, sync_with_dataloader=False))
    set_seed(cfg.seed)

    t0 = time.perf_counter()
    model, tok, info, layout, targets, counts_before, block_size = _load_checked(cfg, ckpt, records, warn)
    n_params = sum(p.numel() for p in model.parameters())
    seconds["load"] = time.perf_counter() - t0

    # -- data
    t0 = time.perf_counter()
    builtin = is_builtin(info.id)
    source = cfg.data or ("builtin:wiki" if builtin else "c4")
    n_eval = cfg.eval_windows if cfg.eval_windows is not None else (
        BUILTIN_EVAL_WINDOWS if builtin else DEFAULT_EVAL_WINDOWS)
    train_w, eval_w, data_desc = _windows_for(source, tok, block_size, n_eval)
    per_update = cfg.batch_size * world
    if train_w.shape[0] < per_update:
        raise DataError(f"{source} gives {train_w.shape[0]} training windows of {block_size} tokens, fewer "
                        f"than one micro-batch on every process ({per_update})",
                        hint="lower --block-size or --batch-size, or use more data")
    if eval_w is not None and eval_w.shape[0] < n_eval:
        warn(f"the eval data holds only {eval_w.shape[0]} windows of {block_size} tokens (asked {n_eval})")
    updates_per_epoch = max(1, train_w.shape[0] // per_update // grad_accum)
    steps = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 1.0) * updates_per_epoch))
    seconds["data"] = time.perf_counter() - t0

    # -- adapter, optimizer, accelerate
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else (
        n_params > LARGE_MODEL_PARAMS)
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        warn(f"{model.config.model_type} does not support gradient checkpointing; training without it")
        checkpointing = False
    if checkpointing:
        lora.set_checkpointing(model, True)
    if cfg.keep_sparsity == "masked-lora":
        lora.attach_masked_lora(model, layout, targets, cfg.rank, cfg.alpha, cfg.dropout)
        net = model
    else:
        net = lora.attach_peft_lora(model, targets, cfg.rank, cfg.alpha, cfg.dropout)
    trainable = lora.trainable_parameters(net)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lora.linear_schedule(cfg.warmup_steps, steps))
    train_loader = torch.utils.data.DataLoader(train_w, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = None
    if eval_w is not None and eval_w.shape[0]:
        eval_loader = torch.utils.data.DataLoader(eval_w, batch_size=cfg.batch_size, shuffle=False)
        net, optimizer, train_loader, eval_loader = accelerator.prepare(net, optimizer, train_loader, eval_loader)
    else:
        net, optimizer, train_loader = accelerator.prepare(net, optimizer, train_loader)

    def run_eval(m: Any, what: str) -> dict | None:
        if eval_loader is None:
            return None
        t = time.perf_counter()
        res = lora.evaluate(accelerator, m, eval_loader, progress, f"eval {what}")
        seconds[f"eval_{what.replace(' ', '_')}"] = time.perf_counter() - t
        return res

    # -- train, keep the zeros, evaluate what is saved
    evals: dict[str, Any] = {"before": run_eval(net, "before")}
    result = lora.train(accelerator, net, optimizer, scheduler, train_loader, steps=steps, grad_accum=grad_accum,
                        max_grad_norm=cfg.max_grad_norm, progress=progress)
    seconds["train"] = result.seconds
    if result.skipped_steps:
        warn(f"{result.skipped_steps} of {steps} updates were skipped by the fp16 loss scaler")
    unwrapped = accelerator.unwrap_model(net)
    if checkpointing:
        lora.set_checkpointing(model, False)
    merge = None
    if cfg.adapter_only:
        evals["after"] = run_eval(net, "after")
        final, counts_after = unwrapped, counts_before  # the base is untouched
    else:
        if cfg.keep_sparsity == "merge-mask":
            evals["after_unmasked"] = run_eval(net, "after unmasked")
        t0 = time.perf_counter()
        final, merge_rep = lora.merge_lora(unwrapped, layout, targets, cfg.keep_sparsity)
        merge = merge_rep.as_dict(targets)
        seconds["merge"] = time.perf_counter() - t0
        evals["after"] = run_eval(final, "after")
        counts_after = lora.zero_counts(layout)

    # -- documents, save
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    lora_doc = {"r": cfg.rank, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.rank, "dropout": cfg.dropout,
                "targets": list(targets), "modules": len(targets) * layout.num_blocks,
                "trainable_params": sum(p.numel() for p in trainable), "model_params": n_params}
    training = {"steps": steps, "micro_batch": cfg.batch_size, "processes": world, "grad_accum": grad_accum,
                "effective_batch": effective, "block_size": block_size, "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps, "schedule": "linear", "optimizer": "adamw",
                "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
                "gradient_checkpointing": checkpointing, "mixed_precision": accelerator.mixed_precision,
                "seed": cfg.seed, "tokens": result.tokens,
                "tokens_per_s": result.tokens / result.seconds if result.seconds > 0 else None,
                "loss_first": result.losses[0], "loss_last": result.losses[-1],
                "loss_curve": [[i + 1, v] for i, v in enumerate(result.losses)]}
    data_doc = {"source": source, **data_desc, "train_windows": int(train_w.shape[0]),
                "eval_windows": 0 if eval_w is None else int(eval_w.shape[0]),
                "updates_per_epoch": updates_per_epoch, "epochs": steps * effective / train_w.shape[0]}
    numel = sum(c[1] for c in counts_before.values())
    zeros_before = sum(c[0] for c in counts_before.values())
    zeros_after = sum(c[0] for c in counts_after.values())
    sparsity = {"numel": numel, "zeros_before": zeros_before, "zeros_after": zeros_after,
                "before": zeros_before / numel, "after": zeros_after / numel,
                "zeros_kept": all(counts_after[k][0] >= c[0] for k, c in counts_before.items())}
    if cfg.adapter_only and zeros_before:
        sparsity["note"] = ("base weights keep their zeros, but base + adapter is dense on the targets; "
                            "merge with --keep-sparsity to save a sparse model")
    finetune_doc = {"mode": cfg.mode, "checkpoint": str(ckpt), "lora": lora_doc, "training": training,
                    "data": data_doc, "eval": evals, "delta_removed": merge, "sparsity": sparsity}
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        _save(cfg, output, final, tok, layout, records, model_dict, finetune_doc, ckpt, info,
              (counts_before, counts_after), claim)
    seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return {"output": str(output), "checkpoint": str(ckpt), "mode": cfg.mode, "model": model_dict,
            "lora": lora_doc, "data": data_doc, "training": training, "eval": evals, "delta_removed": merge,
            "sparsity": sparsity, "warnings": notes, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "_model": final, "_main": accelerator.is_main_process}


def _save(cfg: FinetuneConfig, output: Path, final: Any, tok: Any, layout: Any, records: dict, model_dict: dict,
          finetune_doc: dict, ckpt: Path, info: Any, counts: tuple[dict, dict], claim: Any) -> None:
    from owlctl.formats._io import dumps
    from owlctl.formats.checkpoint import checkpoint_writer, save_checkpoint

    source = dict(records["source"] or {"id": info.id, "content_sha256": info.content_sha256})
    source.update(finetuned_from=str(ckpt), finetune_mode=cfg.mode)
    if cfg.adapter_only:
        with checkpoint_writer(output, cfg.force, claim) as tmp:
            final.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            (tmp / "owlctl-finetune.json").write_text(dumps({"source": source, **finetune_doc}))
        return
    report = _sparsity_report(layout, records["report"], model_dict, *counts, finetune_doc)
    save_checkpoint(final, tok, output, force=cfg.force, allocation=records["allocation"], report=report,
                    source=source, claim=claim)
