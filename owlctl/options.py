"""What owlctl's commands accept, declared once: the enumerations of fixed choices and the option
declarations that the config dataclasses in ``owlctl.ops`` carry as field metadata.

A config field is declared with an :class:`Opt`, e.g. ``method: str = METHOD("wanda")``: the dataclass field
gets its default, and ``owlctl.cli.declare`` turns the same declaration into the Typer option (flags, help,
choices, completion, range check). Adding an option is therefore one edit, and an enumerated option has one
set of choices for every command that takes it. Fields without an ``Opt`` are Python-API only.

Stdlib only: the CLI imports this at start-up (no torch, no typer here).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable


class Choice(str, Enum):
    """A fixed set of values. Members compare equal to their strings, so configs may hold either."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def _method_choice() -> type[Choice]:
    from owlctl.core.methods import REGISTRY  # the registry imports no torch

    return Choice("Method", {name: name for name in REGISTRY})  # type: ignore[return-value]


Method = _method_choice()


class Allocator(Choice):
    owl = "owl"
    uniform = "uniform"
    search = "search"


class Balance(Choice):
    blocks = "blocks"
    params = "params"


class Clamp(Choice):
    redistribute = "redistribute"
    reference = "reference"
    none = "none"


class WandaGroup(Choice):
    row = "row"
    matrix = "matrix"


class Dtype(Choice):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Offload(Choice):
    auto = "auto"
    none = "none"
    disk = "disk"


class ActivationPlace(Choice):
    device = "device"
    cpu = "cpu"
    disk = "disk"


class Bos(Choice):
    auto = "auto"
    always = "always"
    never = "never"


class Split(Choice):
    test = "test"
    validation = "validation"


class Backend(Choice):
    torch = "torch"
    torch_sparse = "torch-sparse"
    onnxruntime = "onnxruntime"
    deepsparse = "deepsparse"


class GenerateBackend(Choice):
    torch = "torch"
    torch_sparse = "torch-sparse"


class ExportFormat(Choice):
    onnx = "onnx"
    packed = "packed"


class SparseKernel(Choice):
    """owlctl.deploy.kernels.KERNELS (a test keeps the two lists equal): bitmask with the best ISA, a forced
    ISA, ``csr`` (the old portable kernel's name, now bitmask-portable), or torch's own sparse formats."""

    auto = "auto"
    bitmask = "bitmask"
    bitmask_avx512vbmi2 = "bitmask-avx512vbmi2"
    bitmask_avx512 = "bitmask-avx512"
    bitmask_avx2 = "bitmask-avx2"
    bitmask_portable = "bitmask-portable"
    csr = "csr"
    torch_csr = "torch-csr"
    torch_bsr = "torch-bsr"


class KeepSparsity(Choice):
    merge_mask = "merge-mask"
    masked_lora = "masked-lora"


class MixedPrecision(Choice):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class FinetuneDevice(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def check_choice(flag: str, value: Any, choices: type[Choice]) -> str:
    """The string value of ``value`` if it is one of ``choices``; else an InputError (Python API callers)."""
    from owlctl.errors import InputError

    v = value.value if isinstance(value, Enum) else value
    if v not in choices.values():
        raise InputError(f"unknown {flag.lstrip('-').replace('-', ' ')} {v!r} ({flag})",
                         hint=f"choose one of: {', '.join(choices.values())}")
    return v


def check_device(value: str) -> str:
    """'cpu', 'auto', 'cuda' or 'cuda:N' (syntax only; whether CUDA exists is checked when it is used)."""
    from owlctl.errors import InputError

    v = str(value).strip()
    if v in ("cpu", "auto", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise InputError(f"unknown device {value!r}", hint="use cpu, cuda, cuda:N or auto")


def finite(flag: str, value: float | None, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse NaN/inf and values outside [lo, hi] (open ends where asked), naming the flag."""
    from owlctl.errors import InputError

    if value is None:
        return
    bad = not (isinstance(value, (int, float)) and math.isfinite(value))
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        rng = f" in {lo_s}, {hi_s}" if lo is not None and hi is not None else (
            f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else f" {'<' if hi_open else '<='} {hi:g}")
        raise InputError(f"{flag} must be a finite number{rng}, got {value}",
                         hint=f"see `owlctl COMMAND --help` for what {flag} means and its usual values")


# ------------------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Opt:
    """How one config field appears on the command line.

    decls: option names ("--method", "-m"), or () with ``argument=True`` for a positional argument; a
        boolean flag pair is written "--kv-cache/--no-kv-cache".
    choices: a Choice enum (shown in --help, validated with exit 2, completed by the shells).
    kind: "device" for --device (cpu | cuda | cuda:N | auto, completed and validated).
    parse: CLI value -> config value (e.g. "3,5" -> (3.0, 5.0)); cli_type is then the type Typer parses.
    min / max: an inclusive range for ints and floats (click IntRange/FloatRange: exit 2 outside it).
    multiple: the option may be repeated (a list on the CLI; parse receives the list).
    """

    decls: tuple[str, ...]
    help: str
    argument: bool = False
    choices: type[Choice] | None = None
    kind: str | None = None
    parse: Callable[[Any], Any] | None = None
    cli_type: Any = None
    min: float | None = None
    max: float | None = None
    multiple: bool = False
    metavar: str | None = None
    show_default: bool = True

    def __call__(self, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
        """A dataclass field with this declaration (``changes`` override it for one command's field)."""
        opt = dataclasses.replace(self, **changes) if changes else self
        return dataclasses.field(default=default, metadata={"cli": opt})

    def with_help(self, help: str) -> "Opt":
        return dataclasses.replace(self, help=help)


def arg(help: str, **kw: Any) -> Opt:
    return Opt((), help, argument=True, **kw)


def opt(*decls: str, help: str, **kw: Any) -> Opt:
    return Opt(tuple(decls), help, **kw)


def parse_floats(text: str | tuple | list) -> tuple[float, ...]:
    """"3,4,5" -> (3.0, 4.0, 5.0) (a tuple or list passes through as floats)."""
    from owlctl.errors import InputError

    if isinstance(text, (tuple, list)):
        return tuple(float(x) for x in text)
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got {text!r}", hint="e.g. 3,4,5,6") from None


def parse_list(values: Any) -> tuple[str, ...] | None:
    """Repeatable, comma-separated values ("a,b" "c") -> ("a", "b", "c"); nothing -> None."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    out = tuple(v.strip() for item in values for v in str(item).split(",") if v.strip())
    return out or None


MODEL_HELP = "HF hub id, local model directory, or a built-in model (builtin:smollm2-135m, builtin:gemma3-270m)."
MODEL = arg(MODEL_HELP)
OUTPUT = opt("--output", "-o", help="Where to write the result.")
FORCE = opt("--force", help="Overwrite an existing output (never the input itself).")
DEVICE = opt("--device", help="cpu | cuda | cuda:N | auto (cuda when available).", kind="device",
             metavar="<device>")
DTYPE = opt("--dtype", help="Weights' dtype: auto (the checkpoint's) or a float type.", choices=Dtype)
SEED = opt("--seed", help="Seed for calibration sampling.")
CALIB = opt("--calib", help="Calibration data: builtin:wiki | c4 | wikitext2 | a local .txt/.jsonl file or folder "
            "(its calibration split; see docs/formats.md).")
BOS = opt("--bos", help="BOS per window: auto (when the tokenizer adds one, e.g. Gemma) | always | never (the "
          "reference: one stream, only its start has BOS).", choices=Bos)
NSAMPLES = opt("--nsamples", help="Calibration sequences (default: 128, built-in model: 32).", min=1)
SEQLEN = opt("--seqlen", help="Tokens per calibration sequence (default: 2048, built-in model: 512).", min=2)
BATCH_SIZE = opt("--batch-size", help="Sequences per forward pass (the result does not depend on it).", min=1)
TARGET_SPARSITY = opt("--target-sparsity", "-s", help="Target global sparsity S: the FRACTION of weights pruned, "
                      "in [0, 1).")
OUTLIER_M = opt("--outlier-m", "-m", help="Outlier threshold M (the paper's Hyper_m): a score is an outlier if > "
                "M x block mean.")
LAMBDA = opt("--lambda", "-l", help="OWL range lambda (the paper's Lamda): per-block sparsities span 2*lambda "
             "(mixed N:M: lambda N steps).")
PATTERN = opt("--pattern", help="N:M with N = weights KEPT per group of M inputs (2:4 = 50%). The reference's "
              "'5:8' is 3:8 here.", metavar="N:M")
METHOD = opt("--method", help="Pruning score: magnitude | wanda | sparsegpt.", choices=Method)
ALLOCATOR = opt("--allocator", help="owl, or uniform (S in every block).", choices=Allocator)
BALANCE = opt("--balance", help="Keep the mean over blocks (reference) or over parameters.", choices=Balance)
CLAMP = opt("--clamp", help="redistribute: clip to [min, max] and shift the rest so the mean stays S; reference: "
            "s <= 0 -> 0.01; none: error when out of [0, 1).", choices=Clamp)
SPECIAL = opt("--special", help="Mixed N:M only: a +1 step becomes +2 (the reference's "
              "wanda_owl_structure_special).")
FROM_PROFILE = opt("--from-profile", help="OWL allocation from this profile (owlctl profile ...).", metavar="PROFILE")
ALLOCATION = opt("--allocation", help="Per-block allocation JSON (owlctl allocate ...).", metavar="FILE")


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """Calibration data options shared by every command that runs calibration forwards."""

    calib: str | None = CALIB(None)
    nsamples: int | None = NSAMPLES(None)
    seqlen: int | None = SEQLEN(None)
    seed: int = SEED(0)
    bos: str = BOS("auto")
    batch_size: int = BATCH_SIZE(8)


OFFLOAD = opt("--offload", help="Where the weights wait: none (the whole model in memory) | disk (streamed "
              "from its safetensors files, one block in memory at a time) | auto (disk when the weights exceed a "
              "third of the available memory).", choices=Offload)
OFFLOAD_ACTIVATIONS = opt("--offload-activations", help="Where the hidden states between blocks wait: device "
                          "(the compute device) | cpu | disk (files in $TMPDIR), for long calibration sets.",
                          choices=ActivationPlace)
REVISION = opt("--revision", help="Hub model revision: a branch, tag or commit (recorded as the resolved commit).",
               metavar="REV")
TRUST_REMOTE_CODE = opt("--trust-remote-code", help="Allow a hub model to run its own Python code (off by "
                        "default; recorded in every output).")


@dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    """Where and in which precision a command computes, and how the model is read."""

    device: str = DEVICE("auto")
    dtype: str = DTYPE("auto")
    offload: str = OFFLOAD("auto")
    offload_activations: str = OFFLOAD_ACTIVATIONS("device")
    revision: str | None = REVISION(None)
    trust_remote_code: bool = TRUST_REMOTE_CODE(False)


def check_compute(cfg: Any) -> None:
    """The ComputeOptions of a config (Python API callers get the CLI's checks)."""
    check_device(cfg.device)
    check_choice("--dtype", cfg.dtype, Dtype)
    check_choice("--offload", cfg.offload, Offload)
    check_choice("--offload-activations", cfg.offload_activations, ActivationPlace)
