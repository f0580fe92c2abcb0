"""A LoRA recovery run on a pruned checkpoint that keeps every pruned weight at zero (SPEC 8, 14).

The recipe defaults follow the reference (r 8, alpha 16, dropout 0.05, q_proj + v_proj, lr 1e-4, AdamW, weight
decay 0, 5 warmup updates then linear decay, blocks of 1024 tokens, 128 sequences per update) with its bugs
fixed (SPEC 12.13): the data is the one asked for, the tokenizer is the checkpoint's, and gradient accumulation
counts every process (effective batch = batch_size x processes x accumulation). Runs under
``accelerate launch`` unchanged; only the main process writes.

Why ~320 lines: the run's phases share their state on one object (FinetuneRun); each phase is short.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlctl.errors import DataError, InputError, ModelError, OwlctlWarning

KNOWN_CORPORA = ("builtin:wiki", "c4", "wikitext2")


DEFAULT_BLOCK_SIZE = 1024  # the reference's block size, capped at the model's context


LARGE_MODEL_PARAMS = 1_000_000_000  # gradient checkpointing is on by default above this


DEFAULT_EVAL_WINDOWS = 128  # the reference's max_eval_samples


BUILTIN_EVAL_WINDOWS = 16  # what a 2-core CPU evaluates in seconds


class FinetuneWarning(OwlctlWarning):
    """Something the user should know that does not stop the run (the CLI prints it on stderr)."""


def windows_for(source: str, tok: Any, block_size: int, n_eval: int) -> tuple[Any, Any, dict]:
    """(train windows, eval windows, description). Corpora evaluate on their validation split; a local file
    has none, so its last n_eval windows are held out from training."""
    from owlctl.engine.data import token_stream
    from owlctl.engine.recovery.lora import windows

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


def sparsity_report(layout: Any, prev: dict | None, model_dict: dict, before: dict, after: dict,
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
                     "zeros": after[(i, n)][0], "realised_sparsity": after[(i, n)][0] / after[(i, n)][1],
                     "expected_pruned": -1} for n in layout.linear_names]
            numel, z = sum(r["numel"] for r in lins), sum(r["zeros"] for r in lins)
            blocks.append({"index": i, "name": layout.block_name(i), "numel": numel, "zeros": z,
                           "realised_sparsity": z / numel, "target_sparsity": None, "n_keep": None, "linears": lins})
        report = report_doc(model_dict, "unknown", {"kind": "unstructured"}, blocks, {}, command="finetune")
    report["finetune"] = finetune
    return report


def batching(cfg: Any, world: int, warn: Any) -> tuple[int, int]:
    """(accumulation, effective batch): every process counts (the reference divided by the micro-batch only)."""
    per_update = cfg.batch_size * world
    grad_accum = max(1, cfg.effective_batch // per_update)
    effective = grad_accum * per_update
    if effective != cfg.effective_batch:
        warn(f"effective batch {cfg.effective_batch} is not a multiple of --batch-size {cfg.batch_size} x "
             f"{world} process(es); using {effective} sequences per update")
    return grad_accum, effective


def load_checked(cfg: Any, ckpt: Path, records: dict, warn: Any) -> tuple:
    """Load the checkpoint and find everything that can be wrong before any training:
    (model, tokenizer, info, layout, targets, zero counts per prunable Linear)."""
    from owlctl.engine.models import load_model
    from owlctl.engine.recovery import lora
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


def save(cfg: Any, output: Path, final: Any, tok: Any, layout: Any, records: dict, model_dict: dict,
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
    report = sparsity_report(layout, records["report"], model_dict, *counts, finetune_doc)
    save_checkpoint(final, tok, output, force=cfg.force, allocation=records["allocation"], report=report,
                    source=source, claim=claim)


@dataclass
class FinetuneRun:
    """One LoRA recovery run, phase by phase: load and check, data, adapter, train, merge, documents, save.
    ``cfg`` is an ops.finetune.FinetuneConfig; ``state`` accelerate's PartialState; ``claim`` the output claim
    (None on processes other than the main one, which do not write)."""

    cfg: Any
    ckpt: Path
    output: Path
    records: dict
    state: Any
    claim: Any
    progress: Any
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.notes.append(msg)
        if self.state.is_main_process:
            warnings.warn(msg, FinetuneWarning, stacklevel=3)

    def run(self) -> dict:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        t_start = time.perf_counter()
        self.world = self.state.num_processes
        self.grad_accum, self.effective = batching(self.cfg, self.world, self.warn)
        self.accelerator = Accelerator(cpu=self.cfg.device == "cpu", mixed_precision=self.cfg.mixed_precision,
                                       gradient_accumulation_plugin=GradientAccumulationPlugin(
                                           num_steps=self.grad_accum, sync_with_dataloader=False))
        set_seed(self.cfg.seed)
        self._timed("load", self._load)
        self._timed("data", self._data)
        self._adapter()
        self._train_and_merge()
        doc = self._documents()
        t0 = time.perf_counter()
        if self.accelerator.is_main_process:
            save(self.cfg, self.output, self.final, self.tok, self.layout, self.records, self.model_dict, doc,
                 self.ckpt, self.info, (self.counts_before, self.counts_after), self.claim)
        self.seconds["save"] = time.perf_counter() - t0
        self.seconds["total"] = time.perf_counter() - t_start
        return doc

    def _timed(self, name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        fn()
        self.seconds[name] = time.perf_counter() - t0

    def _load(self) -> None:
        (self.model, self.tok, self.info, self.layout, self.targets, self.counts_before,
         self.block_size) = load_checked(self.cfg, self.ckpt, self.records, self.warn)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _data(self) -> None:
        from owlctl.engine.models import is_builtin

        cfg, builtin = self.cfg, is_builtin(self.info.id)
        self.source = cfg.data or ("builtin:wiki" if builtin else "c4")
        n_eval = cfg.eval_windows if cfg.eval_windows is not None else (
            BUILTIN_EVAL_WINDOWS if builtin else DEFAULT_EVAL_WINDOWS)
        self.train_w, self.eval_w, self.data_desc = windows_for(self.source, self.tok, self.block_size, n_eval)
        per_update = cfg.batch_size * self.world
        if self.train_w.shape[0] < per_update:
            raise DataError(f"{self.source} gives {self.train_w.shape[0]} training windows of {self.block_size} "
                            f"tokens, fewer than one micro-batch on every process ({per_update})",
                            hint="lower --block-size or --batch-size, or use more data")
        if self.eval_w is not None and self.eval_w.shape[0] < n_eval:
            self.warn(f"the eval data holds only {self.eval_w.shape[0]} windows of {self.block_size} tokens "
                      f"(asked {n_eval})")
        self.updates_per_epoch = max(1, self.train_w.shape[0] // per_update // self.grad_accum)
        self.steps = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 1.0) *
                                                                          self.updates_per_epoch))

    def _adapter(self) -> None:
        import torch

        from owlctl.engine.recovery import lora

        cfg, model = self.cfg, self.model
        ckpt_on = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else (
            self.n_params > LARGE_MODEL_PARAMS)
        if ckpt_on and not getattr(model, "supports_gradient_checkpointing", False):
            self.warn(f"{model.config.model_type} does not support gradient checkpointing; training without it")
            ckpt_on = False
        self.checkpointing = ckpt_on
        if ckpt_on:
            lora.set_checkpointing(model, True)
        if cfg.keep_sparsity == "masked-lora":
            lora.attach_masked_lora(model, self.layout, self.targets, cfg.rank, cfg.alpha, cfg.dropout)
            net = model
        else:
            net = lora.attach_peft_lora(model, self.targets, cfg.rank, cfg.alpha, cfg.dropout)
        self.trainable = lora.trainable_parameters(net)
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lora.linear_schedule(cfg.warmup_steps,
                                                                                            self.steps))
        train = torch.utils.data.DataLoader(self.train_w, batch_size=cfg.batch_size, shuffle=True,
                                            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
        self.eval_loader = None
        if self.eval_w is not None and self.eval_w.shape[0]:
            ev = torch.utils.data.DataLoader(self.eval_w, batch_size=cfg.batch_size, shuffle=False)
            self.net, self.optimizer, self.train_loader, self.eval_loader = self.accelerator.prepare(
                net, optimizer, train, ev)
        else:
            self.net, self.optimizer, self.train_loader = self.accelerator.prepare(net, optimizer, train)

    def _eval(self, m: Any, what: str) -> dict | None:
        from owlctl.engine.recovery import lora

        if self.eval_loader is None:
            return None
        t = time.perf_counter()
        res = lora.evaluate(self.accelerator, m, self.eval_loader, self.progress, f"eval {what}")
        self.seconds[f"eval_{what.replace(' ', '_')}"] = time.perf_counter() - t
        return res

    def _train_and_merge(self) -> None:
        """Train, keep the zeros (merge with the mask, or the masked adapter), evaluate what is saved."""
        from owlctl.engine.recovery import lora

        cfg = self.cfg
        self.evals: dict[str, Any] = {"before": self._eval(self.net, "before")}
        self.result = lora.train(self.accelerator, self.net, self.optimizer, self.scheduler, self.train_loader,
                                 steps=self.steps, grad_accum=self.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                 progress=self.progress)
        self.seconds["train"] = self.result.seconds
        if self.result.skipped_steps:
            self.warn(f"{self.result.skipped_steps} of {self.steps} updates were skipped by the fp16 loss scaler")
        unwrapped = self.accelerator.unwrap_model(self.net)
        if self.checkpointing:
            lora.set_checkpointing(self.model, False)
        self.merge = None
        if cfg.adapter_only:
            self.evals["after"] = self._eval(self.net, "after")
            self.final, self.counts_after = unwrapped, self.counts_before  # the base is untouched
            return
        if cfg.keep_sparsity == "merge-mask":
            self.evals["after_unmasked"] = self._eval(self.net, "after unmasked")
        t0 = time.perf_counter()
        self.final, merge_rep = lora.merge_lora(unwrapped, self.layout, self.targets, cfg.keep_sparsity)
        self.merge = merge_rep.as_dict(self.targets)
        self.seconds["merge"] = time.perf_counter() - t0
        self.evals["after"] = self._eval(self.final, "after")
        self.counts_after = lora.zero_counts(self.layout)

    def _documents(self) -> dict:
        cfg, result = self.cfg, self.result
        self.model_dict = self.info.as_dict(self.layout.family.name, self.layout.num_blocks)
        self.lora_doc = {"r": cfg.rank, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.rank,
                         "dropout": cfg.dropout, "targets": list(self.targets),
                         "modules": len(self.targets) * self.layout.num_blocks,
                         "trainable_params": sum(p.numel() for p in self.trainable), "model_params": self.n_params}
        self.training = {
            "steps": self.steps, "micro_batch": cfg.batch_size, "processes": self.world,
            "grad_accum": self.grad_accum, "effective_batch": self.effective, "block_size": self.block_size,
            "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "schedule": "linear", "optimizer": "adamw",
            "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
            "gradient_checkpointing": self.checkpointing, "mixed_precision": self.accelerator.mixed_precision,
            "seed": cfg.seed, "tokens": result.tokens,
            "tokens_per_s": result.tokens / result.seconds if result.seconds > 0 else None,
            "loss_first": result.losses[0], "loss_last": result.losses[-1],
            "loss_curve": [[i + 1, v] for i, v in enumerate(result.losses)]}
        self.data_doc = {"source": self.source, **self.data_desc, "train_windows": int(self.train_w.shape[0]),
                         "eval_windows": 0 if self.eval_w is None else int(self.eval_w.shape[0]),
                         "updates_per_epoch": self.updates_per_epoch,
                         "epochs": self.steps * self.effective / self.train_w.shape[0]}
        before, after = self.counts_before, self.counts_after
        numel = sum(c[1] for c in before.values())
        zb, za = sum(c[0] for c in before.values()), sum(c[0] for c in after.values())
        self.sparsity = {"numel": numel, "zeros_before": zb, "zeros_after": za, "before": zb / numel,
                         "after": za / numel, "zeros_kept": all(after[k][0] >= c[0] for k, c in before.items())}
        if cfg.adapter_only and zb:
            self.sparsity["note"] = ("base weights keep their zeros, but base + adapter is dense on the targets; "
                                     "merge with --keep-sparsity to save a sparse model")
        return {"mode": cfg.mode, "checkpoint": str(self.ckpt), "lora": self.lora_doc, "training": self.training,
                "data": self.data_doc, "eval": self.evals, "delta_removed": self.merge, "sparsity": self.sparsity}
