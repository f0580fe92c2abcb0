"""Device and dtype names from the command line, resolved against what this machine has."""

from __future__ import annotations

from typing import Any

from owlctl.errors import InputError


def resolve_device(device: str) -> str:
    import torch

    from owlctl.engine.distributed import current

    world = current()
    if world is not None:  # several processes: cuda:LOCAL_RANK or cpu, chosen when the group was joined
        return world.resolve(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but CUDA is not available here", hint="use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:N or auto")
    return device


def resolve_dtype(dtype: str) -> Any:
    import torch

    table = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}", hint="use auto, float32, float16 or bfloat16")
    return table[dtype]
