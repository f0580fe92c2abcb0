"""``SparseLinear``: an ``nn.Linear`` whose pruned weight is stored as its nonzeros and multiplied by owlctl's
C kernels (``owlsparse.c``); ``sparsify`` swaps a model's prunable Linears for it.

Stored format ("bitmask", per row): one uint16 mask word per 16 inputs (bit c of word j: input 16 j + c is
nonzero; words padded to a multiple of 4 per row), then the nonzero values in column order in the weight's
own dtype (float32, bfloat16 or float16), plus int64 row offsets. Bytes per weight at density d:
d x value size + 1/8, so a 70%-sparse matrix moves 0.33x the bytes of dense in float32 and 0.36x in bfloat16
(decode is memory bound, so that ratio is the speed-up to aim for). Products accumulate in float32; the
activations are converted to float32 once per call and the output is written in the input's dtype.
Routes by token count T: 1 (decode), 2-9 (one expansion feeds several tokens), more (tiles of 64 tokens);
16-bit weights take torch's dense GEMM on the densified matrix from ``DENSE_FROM_TOKENS`` tokens on where
the CPU has bf16/fp16 GEMM units.

Kernels (``kernel=``):
  ``bitmask``    owlctl's own; ``isa`` picks the variant: ``avx512vbmi2`` (masked expand, vpexpandw for
                 16-bit values), ``avx512``, ``avx2`` (lookup-table permute), ``portable`` (plain C), ``auto``
                 = the best this CPU has. All multi-threaded (``threads``, default: the CPUs this process
                 may use), rows split by nonzero bytes. ``bitmask-<isa>`` forces a variant by name; ``csr``
                 (the old portable CSR kernel) is accepted as ``bitmask-portable``.
  ``torch-csr`` / ``torch-bsr``  torch's own sparse formats (``to_sparse_csr/bsr`` + ``addmm``), kept as the
                 comparison (slower than dense on the CPUs measured) and as the fallback without a compiler.
  ``auto``       ``bitmask`` with the best ISA; ``torch-csr`` (with a warning) when no C compiler exists.

Over 300 lines on purpose: the packed format, its ctypes calls and the module that owns both must change
together (a format change without the matching call is silent memory corruption), so they stay one unit.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Any

import torch
import torch.nn as nn

from owlctl.deploy.kernels import ISAS, KERNELS, build
from owlctl.errors import InputError, ModelError

_ALIASES = {"csr": ("bitmask", "portable"), **{f"bitmask-{isa}": ("bitmask", isa) for isa in ISAS[1:]}}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_VPAD = 64  # zeros after the values: the kernels read up to 16 past a row (OWL_VPAD is 32)
_ERRORS = {-1: "bad arguments", -2: "this CPU lacks the requested instruction set", -3: "out of memory"}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _dense_from_tokens() -> dict:
    """From how many tokens 16-bit weights are densified into a scratch matrix for torch's dense GEMM.

    Where the CPU has bf16 matrix/dot-product units (AMX-BF16, AVX512-BF16), torch's bf16 GEMM runs on
    them (~1 TFLOP/s per core with AMX, measured) and no FMA-based sparse loop catches it past a few
    tokens; float16 without AMX-FP16 has no such units in torch's CPU kernels, so the sparse kernel stays
    ahead; float32 never switches (the sparse kernel beats MKL's float32 GEMM at 70%). Measurements:
    docs/bench_kernels.md."""
    flags = _cpu_flags()
    bf16 = 16 if flags & {"amx_bf16", "avx512_bf16"} else None
    fp16 = 16 if "amx_fp16" in flags else None
    return {torch.float32: None, torch.bfloat16: bf16, torch.float16: fp16}


DENSE_FROM_TOKENS = _dense_from_tokens()
_scratch: dict = {}
_scratch_lock = threading.Lock()


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def isa_code(lib: Any, isa: str) -> int:
    """``auto`` -> the best variant this CPU runs; a named one must be supported (InputError otherwise)."""
    if isa == "auto":
        return int(lib.owl_isa_best())
    if isa not in build.ISAS:
        raise InputError(f"unknown kernel ISA {isa!r}", hint="use one of: " + ", ".join(ISAS))
    code = build.ISAS[isa]
    if not lib.owl_isa_supported(code):
        best = {v: k for k, v in build.ISAS.items()}[int(lib.owl_isa_best())]
        raise InputError(f"this CPU cannot run the {isa} kernels", hint=f"use isa auto (here: {best}) or portable")
    return code


def isa_name(code: int) -> str:
    return {v: k for k, v in build.ISAS.items()}[code]


def resolve_kernel(kernel: str, isa: str = "auto") -> tuple[str, str]:
    """(kernel, isa) to build with: aliases expanded, ``auto`` decided, the library built if needed.

    ``auto`` without a compiler gives ("torch-csr", "") with a warning; an explicit ``bitmask*`` without one
    raises KernelUnavailableError (an OwlctlError with a hint)."""
    if kernel not in KERNELS:
        raise InputError(f"unknown sparse kernel {kernel!r}", hint="use one of: " + ", ".join(KERNELS))
    if isa not in ISAS:
        raise InputError(f"unknown kernel ISA {isa!r}", hint="use one of: " + ", ".join(ISAS))
    if kernel in ("torch-csr", "torch-bsr"):
        return kernel, ""
    if kernel in _ALIASES:
        kernel, isa = _ALIASES[kernel]
    if kernel == "auto":
        ok, why = build.available()
        if not ok:
            warnings.warn(f"{why}; falling back to torch's CSR kernel (slower than dense). Install a C compiler "
                          "for owlctl's sparse kernels.", stacklevel=2)
            return "torch-csr", ""
    lib = build.library()
    return "bitmask", isa_name(isa_code(lib, isa))


class SparseLinear(nn.Module):
    """A Linear whose weight is stored in the bitmask format. Same inputs and outputs as ``nn.Linear``
    (any leading dims; float32 / bfloat16 / float16 input computed directly, other float dtypes through
    float32); inference only. ``threads`` (>= 1), ``isa`` (see ``ISAS``) and ``dense_from_tokens`` may be
    changed after construction."""

    def __init__(self, linear: nn.Linear, threads: int | None = None, isa: str = "auto") -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype not in _DTYPES:
            raise InputError(f"owlctl's sparse kernels store float32, bfloat16 or float16 weights; this one is "
                             f"{w.dtype}", hint="load the model with --dtype float32/bfloat16, or use "
                                                "--sparse-kernel torch-csr")
        if w.device.type != "cpu":
            raise InputError("owlctl's sparse kernels run on the CPU; this weight is on " + str(w.device),
                             hint="use --device cpu")
        self.out_features, self.in_features = w.shape
        self.kernel = "bitmask"
        self._lib = build.library()
        self.threads = default_threads() if threads is None else int(threads)
        self.isa = isa
        self._dense_from = DENSE_FROM_TOKENS.get(w.dtype)
        mask, vals, row_ptr = pack_bitmask(w)
        self.nnz = int(row_ptr[-1])
        self.register_buffer("mask", mask)
        self.register_buffer("vals", vals)
        self.register_buffer("row_ptr", row_ptr)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._mat: Any = None
        self._bind()

    # -- the C handle: pointers into this module's buffers, rebuilt whenever they may have moved
    def _bind(self) -> None:
        lib = self._lib
        for name in ("mask", "vals", "row_ptr"):
            t = getattr(self, name)
            if t.device.type != "cpu" or not t.is_contiguous():
                raise InputError(f"SparseLinear buffers must stay contiguous on the CPU ({name} is on {t.device})",
                                 hint="keep the sparsified model on the CPU")
        if self.vals.dtype not in _DTYPES or self.mask.dtype != torch.int16 or self.row_ptr.dtype != torch.int64:
            raise InputError(f"SparseLinear cannot compute with values in {self.vals.dtype}",
                             hint="use float32, bfloat16 or float16")
        self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()
        mat = ctypes.create_string_buffer(int(lib.owl_mat_size()))
        ng = self.mask.shape[1]
        rc = lib.owl_mat_init(mat, self.out_features, self.in_features, ng, _DTYPES[self.vals.dtype],
                              self.mask.data_ptr(), self.vals.data_ptr(), self.vals.numel(), self.row_ptr.data_ptr(),
                              None if self._bias32 is None else self._bias32.data_ptr(), max(1, self.threads))
        if rc != 0:
            raise ModelError(f"SparseLinear buffers are inconsistent ({_ERRORS.get(rc, rc)}): mask popcounts, "
                             "row offsets and value count disagree", hint="rebuild it from the dense Linear")
        self._mat = mat
        self._mat_addr = ctypes.addressof(mat)
        self._isa_code = isa_code(lib, self.isa)
        self._isa_key = self.isa
        self._vals_dtype = self.vals.dtype
        self._fn = lib.owl_linear

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        self._mat = None  # buffers may be new tensors (.to, .half, ...): rebind on the next call
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mat = None  # new contents: revalidate before the kernels read them

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_mat", "_fn", "_lib", "_mat_addr"):
            state.pop(k, None)
        state["_mat"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lib = build.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hot path (one decode token through 210 Linears of a small model) avoids buffer attributes
        # (nn.Module.__getattr__) and device objects: about 6 us of Python per call, half of it torch.empty
        if self._mat is None or self._isa_key is not self.isa:
            self._bind()
        code = _DTYPES.get(x.dtype)
        if code is None or not x.is_cpu or x.requires_grad:
            return self._forward_other(x)
        shape = x.shape
        if shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: input has {shape[-1]} features, expected {self.in_features}")
        if not x.is_contiguous():
            x = x.contiguous()
        tokens = x.numel() // self.in_features
        if self._dense_from is not None and tokens >= self._dense_from and x.dtype is self._vals_dtype:
            return self._forward_dense(x)
        y = torch.empty(shape[:-1] + (self.out_features,), dtype=x.dtype)
        if tokens:
            rc = self._fn(self._mat_addr, x.data_ptr(), y.data_ptr(), tokens, code, code, self.threads,
                          self._isa_code)
            if rc:
                raise ModelError(f"owlctl sparse kernel failed: {_ERRORS.get(rc, rc)}")
        return y

    def _forward_other(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs the kernels do not take directly: gradients (refused), other devices, other dtypes."""
        if x.requires_grad and torch.is_grad_enabled():
            raise InputError("SparseLinear is inference-only (its kernels have no backward)",
                             hint="run under torch.inference_mode() or torch.no_grad()")
        if not x.is_cpu:
            raise InputError(f"SparseLinear runs on the CPU; the input is on {x.device}", hint="use --device cpu")
        if x.dtype in _DTYPES:  # requires_grad under no_grad: the same computation
            return self.forward(x.detach())
        return self.forward(x.float()).to(x.dtype)

    @property
    def dense_from_tokens(self) -> int | None:
        """From this many tokens on, 16-bit weights take the dense route (None: never)."""
        return self._dense_from

    @dense_from_tokens.setter
    def dense_from_tokens(self, value: int | None) -> None:
        self._dense_from = value

    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight back as a dense (C_out, C_in) tensor in the stored dtype (into ``out`` if given)."""
        if self._mat is None or self._isa_key != self.isa:
            self._bind()
        shape = (self.out_features, self.in_features)
        if out is None:
            out = torch.empty(shape, dtype=self.vals.dtype)
        if out.shape != shape or out.dtype != self.vals.dtype or not out.is_contiguous():
            raise InputError(f"dense_weight needs a contiguous {shape} {self.vals.dtype} tensor")
        rc = self._lib.owl_densify(self._mat_addr, out.data_ptr(), 0, self.out_features, self.threads)
        if rc:
            raise ModelError(f"owlctl sparse kernel failed: {_ERRORS.get(rc, rc)}")
        return out

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens, 16-bit weights: densify into a shared scratch matrix and use torch's GEMM."""
        dt = self.vals.dtype
        n = self.out_features * self.in_features
        with _scratch_lock:  # one scratch per dtype, grown to the largest matrix seen
            buf = _scratch.get(dt)
            if buf is None or buf.numel() < n:
                buf = _scratch[dt] = torch.empty(n, dtype=dt)
            w = self.dense_weight(buf[:n].view(self.out_features, self.in_features))
            bias = None if self.bias is None else self.bias.to(dt)
            return torch.nn.functional.linear(x.to(dt), w, bias).to(x.dtype)

    def stored_bytes(self) -> int:
        """Bytes of the stored weight (what a call streams): mask, values with their padding, row offsets."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.vals, self.row_ptr))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel=bitmask, "
                f"isa={self.isa}, threads={self.threads}, dtype={str(self.vals.dtype).replace('torch.', '')}, "
                f"density={self.nnz / (self.in_features * self.out_features):.3f}")


def pack_bitmask(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (C_out, C_in) -> (mask int16 (C_out, ng) holding uint16 bits, values 1-D in W's dtype with _VPAD
    zeros after, row offsets int64 (C_out + 1)); ng = ceil(C_in / 16) rounded up to a multiple of 4."""
    n_out, n_in = w.shape
    ng = -(-n_in // 64) * 4
    nz = w != 0  # NaN stays (it is != 0); -0.0 contributes nothing and is dropped
    nzp = torch.nn.functional.pad(nz, (0, ng * 16 - n_in)) if ng * 16 != n_in else nz
    lanes = torch.arange(16, dtype=torch.int32)
    words = (nzp.reshape(n_out, ng, 16).to(torch.int32) << lanes).sum(-1, dtype=torch.int32)
    mask = torch.where(words >= 32768, words - 65536, words).to(torch.int16).contiguous()
    row_ptr = torch.zeros(n_out + 1, dtype=torch.int64)
    torch.cumsum(nz.sum(1, dtype=torch.int64), 0, out=row_ptr[1:])
    vals = torch.cat([w[nz], torch.zeros(_VPAD, dtype=w.dtype)]).contiguous()
    return mask, vals, row_ptr


class TorchSparseLinear(nn.Module):
    """torch's own CSR / BSR formats with ``torch.sparse.mm`` / ``addmm`` (comparison and fallback)."""

    def __init__(self, linear: nn.Linear, kernel: str) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        self.kernel = kernel
        self.dtype = w.dtype
        self.nnz = int(torch.count_nonzero(w))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and only a comparison
            warnings.simplefilter("ignore", UserWarning)
            if kernel == "torch-csr":
                self.weight_sparse = w.to_sparse_csr()
            else:
                bs = _bsr_block(self.out_features, self.in_features)
                self.weight_sparse = w.to_sparse_bsr((bs, bs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.bias is None:
            y = torch.sparse.mm(self.weight_sparse, x2.t()).t()
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight_sparse, x2.t()).t()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def stored_bytes(self) -> int:
        ws = self.weight_sparse
        idx = (ws.crow_indices(), ws.col_indices())
        return sum(t.numel() * t.element_size() for t in (ws.values(), *idx))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
                f"density={self.nnz / (self.in_features * self.out_features):.3f}")


def _bsr_block(rows: int, cols: int) -> int:
    for bs in (16, 8, 4, 2):
        if rows % bs == 0 and cols % bs == 0:
            return bs
    return 1


def sparse_linear(linear: nn.Linear, kernel: str = "bitmask", threads: int | None = None,
                  isa: str = "auto") -> nn.Module:
    """The sparse replacement of one Linear; ``kernel`` and ``isa`` as in ``resolve_kernel``."""
    kernel, isa = resolve_kernel(kernel, isa)
    if kernel == "bitmask":
        return SparseLinear(linear, threads=threads, isa=isa)
    return TorchSparseLinear(linear, kernel)


def sparsify(model: Any, kernel: str = "auto", threads: int | None = None, isa: str = "auto",
             min_sparsity: float = 0.0) -> dict:
    """Swap every prunable Linear of ``model`` (its family's layout) for a sparse one, in place.

    Matrices with fewer than ``min_sparsity`` (a fraction) zeros, or not on the CPU, stay dense; with
    ``auto``, weights in a dtype the C kernels do not store (e.g. float64) use torch-csr. Returns the
    kernel, ISA and threads used, counts and bytes (dense vs stored) for reporting."""
    from owlctl.families import resolve

    layout = resolve(model)
    linears = [(i, name, lin) for i in range(layout.num_blocks) for name, lin in layout.linears(i).items()]
    dtypes = {lin.weight.dtype for _, _, lin in linears}
    fallback = None
    if kernel == "auto" and not dtypes <= set(_DTYPES):
        kernel, fallback = "torch-csr", f"weights in {sorted(map(str, dtypes))}: the C kernels store fp32/bf16/fp16"
    kernel, isa = resolve_kernel(kernel, isa)
    if kernel != "bitmask" and fallback is None and not build.available()[0]:
        fallback = build.available()[1]
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    swapped = kept = dense_bytes = sparse_bytes = 0
    with torch.no_grad():
        for i, name, lin in linears:
            w = lin.weight
            zeros = 1.0 - int(torch.count_nonzero(w)) / w.numel()
            if zeros < min_sparsity or w.device.type != "cpu":
                kept += 1
                continue
            sl = SparseLinear(lin, threads=threads, isa=isa) if kernel == "bitmask" else TorchSparseLinear(lin, kernel)
            parent_name, _, attr = name.rpartition(".")
            block = layout.blocks[i]
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, sl)
            swapped += 1
            dense_bytes += w.numel() * w.element_size()
            sparse_bytes += sl.stored_bytes()
    info = {"kernel": kernel, "isa": isa or None, "threads": threads if kernel == "bitmask" else None,
            "swapped": swapped, "kept_dense": kept, "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes}
    if fallback:
        info["fallback"] = fallback
    return info
