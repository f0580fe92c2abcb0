"""CUDA 2:4 semi-structured sparsity for bench's torch-sparse row: every prunable Linear of a 2:4 checkpoint
stored with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS kernels)."""

from __future__ import annotations

from typing import Any

from owlctl.errors import InputError


def is_two_four(w: Any) -> bool:
    """True when every group of 4 consecutive inputs of every row keeps at most 2 weights (2:4)."""
    rows, cols = w.shape
    if cols % 4:
        return False
    return bool(((w.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def semi_structured(model: Any) -> dict:
    """CUDA: store every prunable Linear of a 2:4 checkpoint with ``torch.sparse.to_sparse_semi_structured``.

    Needs a CUDA GPU of compute capability >= 8.0 and float16/bfloat16 weights (cuSPARSELt or CUTLASS
    kernels). The model must already be on the GPU. Not testable on owlctl's CPU-only CI.
    """
    import torch

    from owlctl.families import resolve

    if not torch.cuda.is_available():
        raise InputError("2:4 semi-structured sparsity needs a CUDA GPU", hint="use --device cpu for the CPU kernels")
    to_sss = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if to_sss is None:
        raise InputError(f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured",
                         hint="upgrade torch, or benchmark with --backend torch")
    major, _minor = torch.cuda.get_device_capability()
    if major < 8:
        raise InputError("2:4 semi-structured kernels need compute capability >= 8.0 (Ampere or newer)")
    layout = resolve(model)
    swapped = 0
    for i in range(layout.num_blocks):
        for name, lin in layout.linears(i).items():
            w = lin.weight.detach()
            if w.dtype not in (torch.float16, torch.bfloat16):
                raise InputError(f"2:4 kernels need float16 or bfloat16 weights; this model is {w.dtype}",
                                 hint="pass --dtype float16 (or bfloat16)")
            if not is_two_four(w):
                raise InputError(f"block {i} {name} is not 2:4 sparse; the CUDA sparse path needs a 2:4 checkpoint",
                                 hint="prune with `owlctl nm MODEL --pattern 2:4 -o DIR`")
            lin.weight = torch.nn.Parameter(to_sss(w), requires_grad=False)
            swapped += 1
    return {"kernel": "cuda-2:4 (to_sparse_semi_structured)", "swapped": swapped}
