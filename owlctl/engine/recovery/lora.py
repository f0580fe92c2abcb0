"""LoRA on a pruned model without losing its zeros: adapters, the sparsity-keeping merge, and one training
loop written for ``accelerate`` (single process, multi-GPU or multi-node, unchanged).

LoRA (Hu et al. 2021) adds a low-rank update to a frozen Linear y = W x:

    y = W x + s * B A x,      A: (r, C_in), B: (C_out, r), s = alpha / r,  B = 0 at the start.

The delta ΔW = s B A is dense, so merging it into a pruned W fills the zeros (SPEC 8). With the keep mask
M = (W != 0), taken from the checkpoint before training, owlctl offers two fixes:

    merge-mask   train the plain (peft) adapter, then W' = W + ΔW ⊙ M. The part ΔW ⊙ (1 - M) is dropped,
                 which changes the function; ||ΔW ⊙ (1 - M)||_F / ||ΔW||_F is reported per module.
    masked-lora  train y = W x + (ΔW ⊙ M) x (``MaskedLoraLinear``), so W' = W + ΔW ⊙ M is exactly the trained
                 function and exactly as sparse as W. Costs one extra (C_out, C_in) product per target forward.

Why one module of ~320 lines: the adapters, the mask-keeping merge and the training loop share one
definition of the keep mask; splitting them would spread it over three files.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from owlctl.errors import InputError

ALL_LINEAR = "all-linear"


# ------------------------------------------------------------------------------------------ targets
def resolve_targets(layout: Any, spec: str) -> tuple[str, ...]:
    """Map ``--targets`` ("q_proj,v_proj", "self_attn.q_proj", "all-linear") to the family's Linear names
    relative to a block (e.g. "self_attn.q_proj"), in execution order. Unknown names are an InputError."""
    names = tuple(layout.linear_names)
    if spec.strip() == ALL_LINEAR:
        return names
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    if not wanted:
        raise InputError("--targets is empty", hint=f"e.g. --targets q_proj,v_proj or --targets {ALL_LINEAR}")
    leaves = ", ".join(n.rsplit(".", 1)[-1] for n in names)
    chosen: set[str] = set()
    for t in wanted:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise InputError(f"--targets: {t!r} is not a prunable Linear of this {layout.family.name} model",
                             hint=f"choose among {leaves}, or --targets {ALL_LINEAR}")
        chosen.update(hits)
    return tuple(n for n in names if n in chosen)


def target_modules(layout: Any, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Full module name (as in ``model.named_modules()``) -> Linear, for every block and target."""
    return {f"{layout.block_name(i)}.{name}": lin for i in range(layout.num_blocks)
            for name, lin in layout.linears(i).items() if name in targets}


def zero_counts(layout: Any) -> dict[tuple[int, str], tuple[int, int, list[int]]]:
    """(block index, Linear name) -> (exact zeros, weights, shape) for every prunable Linear; one device sync."""
    items = [(i, name, lin.weight) for i in range(layout.num_blocks) for name, lin in layout.linears(i).items()]
    zeros = torch.stack([(w == 0).sum() for _i, _n, w in items]).tolist()
    return {(i, n): (int(z), w.numel(), list(w.shape)) for (i, n, w), z in zip(items, zeros)}


# --------------------------------------------------------------------------------------- adapters
class MaskedLoraLinear(nn.Module):
    """y = W x + (s B A ⊙ M) x with W frozen and M = (W != 0) fixed when the wrapper is built.

    A and B are float32 whatever the base dtype, so small updates are not lost to fp16/bf16 rounding.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init; B = 0 keeps f unchanged
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("keep_mask", base.weight != 0, persistent=False)

    def delta(self) -> torch.Tensor:
        """ΔW ⊙ M, (C_out, C_in) float32."""
        return (self.lora_B @ self.lora_A) * self.scaling * self.keep_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.delta()
        return y + F.linear(self.dropout(x).to(d.dtype), d).to(y.dtype)


def attach_masked_lora(model: Any, layout: Any, targets: tuple[str, ...], r: int, alpha: float,
                       dropout: float) -> dict[str, MaskedLoraLinear]:
    """Freeze the model and replace each target Linear by a ``MaskedLoraLinear`` (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for full, lin in target_modules(layout, targets).items():
        parent_name, leaf = full.rsplit(".", 1)
        w = MaskedLoraLinear(lin, r, alpha, dropout)
        setattr(model.get_submodule(parent_name), leaf, w)
        wrapped[full] = w
    return wrapped


def attach_peft_lora(model: Any, targets: tuple[str, ...], r: int, alpha: float, dropout: float) -> Any:
    """A peft PeftModel with plain LoRA on ``targets`` (names relative to a block: peft matches suffixes)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     task_type="CAUSAL_LM", use_rslora=False, use_dora=False, fan_in_fan_out=False)
    with warnings.catch_warnings():  # peft probes a transformers attribute that v5 deprecates; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, cfg)


def set_checkpointing(model: Any, on: bool) -> None:
    """Activation (gradient) checkpointing on the HF model; non-reentrant, so frozen embeddings need no
    input-grad trick. transformers 5 renamed the methods; older versions only have the old names."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def trainable_parameters(model: Any) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ merging
@dataclass
class MergeReport:
    """How much of the LoRA delta the keep mask removed (Frobenius norms), per module and per target name."""

    modules: list[dict] = field(default_factory=list)

    def as_dict(self, targets: tuple[str, ...]) -> dict:
        def frac(rows: list[dict]) -> float:
            tot = math.sqrt(sum(r["delta_norm"] ** 2 for r in rows))
            rem = math.sqrt(sum(r["removed_norm"] ** 2 for r in rows))
            return rem / tot if tot > 0 else 0.0

        by_target = {t: frac([m for m in self.modules if m["name"].endswith("." + t)]) for t in targets}
        return {"definition": "||dW * (1 - M)||_F / ||dW||_F, M = (base weight != 0)",
                "overall": frac(self.modules), "by_target": by_target, "modules": self.modules}


def _merge_one(name: str, lin: nn.Linear, delta: torch.Tensor, keep: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """W <- W + delta ⊙ keep (in float32, cast back); returns the report row (norms still on device)."""
    w = lin.weight
    delta = delta.to(device=w.device, dtype=torch.float32)
    keep = keep.to(w.device)
    norms = torch.stack([delta.norm(), (delta * ~keep).norm()])
    with torch.no_grad():
        w.copy_((w.float() + delta * keep).to(w.dtype))
    return {"name": name}, norms


def merge_lora(model: Any, layout: Any, targets: tuple[str, ...], mode: str) -> tuple[Any, MergeReport]:
    """Fold the trained adapter into the base weights keeping every zero; returns (plain HF model, report).

    ``model`` is the unwrapped training model: a PeftModel (merge-mask) or the HF model holding
    ``MaskedLoraLinear`` wrappers (masked-lora)."""
    rows, norms = [], []
    if mode == "masked-lora":
        for full, _lin in target_modules(layout, targets).items():
            parent_name, leaf = full.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            w = getattr(parent, leaf)
            with torch.no_grad():
                row, n = _merge_one(full, w.base, w.delta().detach(), w.keep_mask)
            setattr(parent, leaf, w.base)
            rows.append(row)
            norms.append(n)
        base = model
    else:
        from peft import get_peft_model_state_dict

        # The adapter as peft saves it: "base_model.model.<module>.lora_A.weight" / ".lora_B.weight".
        state = get_peft_model_state_dict(model)
        scaling = float(model.peft_config["default"].lora_alpha) / model.peft_config["default"].r
        base = model.unload()  # the HF model with its original (still sparse) weights
        for key, a in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            full = key[len("base_model.model."):-len(".lora_A.weight")]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            lin = base.get_submodule(full)
            keep = lin.weight != 0
            with torch.no_grad():
                row, n = _merge_one(full, lin, (b.float() @ a.float()) * scaling, keep)
            rows.append(row)
            norms.append(n)
    for row, (d, r) in zip(rows, torch.stack(norms).tolist() if norms else []):
        row.update(delta_norm=d, removed_norm=r, removed_fraction=r / d if d > 0 else 0.0)
    return base, MergeReport(rows)


# ------------------------------------------------------------------------------------------ training
def windows(ids: torch.Tensor, block_size: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, block_size) windows of a 1-D token stream; the remainder is dropped."""
    n = ids.numel() // block_size
    if limit is not None:
        n = min(n, limit)
    return ids[: n * block_size].view(n, block_size).long()


def linear_schedule(warmup_steps: int, total_steps: int):
    """lr factor for update u = k + 1 (k = updates done): u / W while u <= W, then a linear decay that
    reaches 1 / (T - W) at the last update (the run_clm recipe without its wasted lr-0 first update)."""

    def factor(k: int) -> float:
        u = k + 1
        if warmup_steps > 0 and u <= warmup_steps:
            return u / warmup_steps
        return max(0.0, (total_steps - u + 1) / max(1, total_steps - warmup_steps))

    return factor


@dataclass
class TrainResult:
    losses: list[float]
    tokens: int
    seconds: float
    skipped_steps: int = 0


def _cycle(loader: Any) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, loader: Any, *, steps: int,
          grad_accum: int, max_grad_norm: float | None, progress: Any = None) -> TrainResult:
    """``steps`` optimizer updates of ``grad_accum`` micro-batches each (per process), the accelerate way:
    ``accumulate`` + ``backward`` (which divides by grad_accum) + a prepared optimizer that only steps on
    the synchronising micro-batch. Loss per update is the token mean over every process."""
    model.train()
    params = trainable_parameters(model)
    batches = _cycle(loader)
    losses: list[float] = []
    tokens = skipped = 0
    show = progress is not None and accelerator.is_local_main_process
    # Advance per micro-batch (an update can take minutes on CPU); the text shows the last update's loss.
    cm = progress.task("finetune", steps * grad_accum) if show else nullcontext(None)
    t0 = time.perf_counter()
    with cm as task:
        for step in range(steps):
            total = None
            for _micro in range(grad_accum):
                batch = next(batches)
                with accelerator.accumulate(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    accelerator.backward(loss)
                    total = loss.detach() if total is None else total + loss.detach()
                    tokens += batch.numel() * accelerator.num_processes
                    if accelerator.sync_gradients:
                        if max_grad_norm:
                            accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if task is not None:
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    last = f"{losses[-1]:.4f}" if losses else "-"
                    task.advance(1, info=f"update {step + 1}/{steps}  loss {last}  {rate:,.0f} tok/s")
            if not accelerator.sync_gradients:  # our micro count and accelerate's disagree: never silently
                raise RuntimeError("gradient accumulation out of step with accelerate")
            if accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this update
                skipped += 1
            else:
                scheduler.step()
            losses.append(float(accelerator.reduce(total / grad_accum, reduction="mean")))
            if task is not None:
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                task.advance(0, info=f"update {step + 1}/{steps}  loss {losses[-1]:.4f}  {rate:,.0f} tok/s")
    model.eval()
    return TrainResult(losses, tokens, time.perf_counter() - t0, skipped)


@torch.no_grad()
def evaluate(accelerator: Any, model: Any, loader: Any, progress: Any = None, description: str = "eval") -> dict:
    """Mean next-token cross-entropy (fp32) and accuracy over equal-length windows, gathered over processes.
    Returns {"loss", "perplexity" = exp(loss), "accuracy", "windows", "tokens"}."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    rows = []
    show = progress is not None and accelerator.is_local_main_process
    cm = progress.task(description, len(loader)) if show else nullcontext(None)
    with cm as task, accelerator.autocast():
        for batch in loader:
            logits = net(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
            acc = (logits.argmax(-1) == target).float().mean(1)
            rows.append(accelerator.gather_for_metrics(torch.stack([ce, acc], 1)))
            if task is not None:
                task.advance(1)
    net.train(was_training)
    if not rows:
        return {"loss": None, "perplexity": None, "accuracy": None, "windows": 0, "tokens": 0}
    allrows = torch.cat(rows)
    loss, acc = allrows.mean(0).tolist()
    n = allrows.shape[0]
    seqlen = loader.dataset.shape[1] if hasattr(loader.dataset, "shape") else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else None, "accuracy": acc,
            "windows": n, "tokens": n * (seqlen - 1) if seqlen else None}
