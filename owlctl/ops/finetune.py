"""`owlctl finetune`: LoRA on a pruned checkpoint that keeps every pruned weight at zero (SPEC 8, 14).

The recipe defaults follow the reference (r 8, alpha 16, dropout 0.05, q_proj + v_proj, lr 1e-4, AdamW, weight
decay 0, 5 warmup updates then linear decay, blocks of 1024 tokens, 128 sequences per update) with its bugs
fixed (SPEC 12.13): the data is the one asked for, the tokenizer is the checkpoint's, and gradient accumulation
counts every process (effective batch = batch_size x processes x accumulation). Runs under
``accelerate launch`` unchanged; only the main process writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.recovery.finetune import FinetuneWarning  # noqa: F401 (the API's warning class)
from owlctl.errors import InputError
from owlctl.options import DTYPE, FORCE, OUTPUT, FinetuneDevice, KeepSparsity, MixedPrecision, arg, opt

KEEP_MODES = ("merge-mask", "masked-lora")


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


def finetune(cfg: FinetuneConfig, progress: Any = None) -> dict:
    """LoRA-finetune a (pruned) checkpoint and save it without losing its zeros. Returns the summary document
    (on every process; ``process.main`` says whether this one wrote the output)."""
    _validate(cfg)
    from owlctl.formats.checkpoint import read_checkpoint_records
    from owlctl.formats.claims import check_not_input, check_output

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
    from owlctl.engine.recovery.finetune import FinetuneRun
    from owlctl.ops.common import output_claim, peak_rss_mb

    # only the main process writes, so only it claims the output (a lock; the temporary directory now)
    with output_claim(output if state.is_main_process else None, cfg.force, "dir", inputs=[ckpt]) as claim:
        run = FinetuneRun(cfg, ckpt, output, records, state, claim, progress)
        doc = run.run()
    from owlctl.formats._io import header

    return {**header("finetune", "finetune", run.model_dict, {k: round(v, 3) for k, v in run.seconds.items()}),
            "output": str(output), "checkpoint": str(ckpt), "mode": cfg.mode,
            "lora": doc["lora"], "data": doc["data"], "training": doc["training"], "eval": doc["eval"],
            "delta_removed": doc["delta_removed"], "sparsity": doc["sparsity"], "warnings": run.notes,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "process": {"index": state.process_index, "count": state.num_processes,
                        "main": state.is_main_process}}


