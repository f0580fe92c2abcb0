"""The maintained sparse CPU path: Linears whose weights skip the pruned zeros.

Decode (batch 1, one new token) multiplies every weight matrix W (C_out, C_in) by one vector x (C_in,).
It is bound by memory traffic: dense fp32 moves 4 bytes per weight, 0 or not. A 70% sparse matrix holds
0.3 of the weights, so a format that stores only the nonzeros moves about 0.3 x 4 bytes plus its index.

Kernels (``SparseLinear.kernel``):
  ``bitmask``   owlctl's own, AVX-512: per row, one 16-bit mask per 16 inputs and the nonzero values in
                order; each step loads 16 values, expands them into the mask's lanes (vexpandps) and does
                one FMA with 16 inputs. Index cost: 1 bit per weight (0.42 bytes per nonzero at 70%).
  ``csr``       owlctl's own, portable C: CSR with 16-bit column indices (6 bytes per nonzero), scalar
                gather-FMA with four accumulators. Used where AVX-512 is missing.
  ``torch-csr`` / ``torch-bsr``  torch's own sparse formats (``Tensor.to_sparse_csr/bsr`` + ``addmm``),
                kept for comparison; on this CPU they were slower than dense (docs/bench.md).
Several tokens at once (prefill, batch > 1) use the same stored format in a sparse x dense-matrix loop.

The C code is compiled once with the system C compiler (``cc -O3 -march=native``, no OpenMP, so one
thread) into the owlctl cache, keyed by a hash of the source, flags and compiler, and loaded with ctypes;
building takes about a second. Without a compiler, or for non-float32 weights, ``kernel="auto"`` falls back
to ``torch-csr``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from owlctl.errors import InputError, ModelError

KERNELS = ("auto", "bitmask", "csr", "torch-csr", "torch-bsr")

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int owl_has_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* y (C_out) = W x + b; W in CSR with 16-bit column indices. */
void owl_csr_mv(int64_t n_out, const int64_t *rp, const uint16_t *col, const float *val,
                const float *x, const float *bias, float *y) {
    for (int64_t r = 0; r < n_out; ++r) {
        const int64_t b = rp[r], e = rp[r + 1];
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int64_t k = b;
        for (; k + 4 <= e; k += 4) {
            a0 += val[k] * x[col[k]];
            a1 += val[k + 1] * x[col[k + 1]];
            a2 += val[k + 2] * x[col[k + 2]];
            a3 += val[k + 3] * x[col[k + 3]];
        }
        for (; k < e; ++k) a0 += val[k] * x[col[k]];
        y[r] = (a0 + a1) + (a2 + a3) + (bias ? bias[r] : 0.f);
    }
}

/* Several tokens: y (T, C_out) = x (T, C_in) W^T + b. Tokens go in tiles of OWL_TILE: the tile is first
   transposed into a packed buffer xb (C_in, OWL_TILE), which stays in L2 (and has no power-of-two stride
   to alias cache sets) while every row of W streams past it. Each row's nonzeros are applied to 16 tokens
   at a time held in a fixed-size accumulator (vector registers). */
#define OWL_TB 16
#define OWL_TILE 64
typedef float owl_vf __attribute__((vector_size(4 * OWL_TB)));  /* 16 floats: one zmm, or two ymm */

static inline owl_vf owl_load(const float *p) { owl_vf v; memcpy(&v, p, sizeof v); return v; }

static void owl_row_tile(int64_t nnz, const int32_t *cols, const float *v, int64_t tn, const float *xb,
                         float b0, float *y, int64_t n_out) {
    int64_t t = 0;
    for (; t + OWL_TB <= tn; t += OWL_TB) {
        /* four independent accumulators hide the FMA latency */
        owl_vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float *x0 = xb + t;
        int64_t k = 0;
        for (; k + 4 <= nnz; k += 4) {
            a0 += v[k] * owl_load(x0 + (int64_t)cols[k] * OWL_TILE);
            a1 += v[k + 1] * owl_load(x0 + (int64_t)cols[k + 1] * OWL_TILE);
            a2 += v[k + 2] * owl_load(x0 + (int64_t)cols[k + 2] * OWL_TILE);
            a3 += v[k + 3] * owl_load(x0 + (int64_t)cols[k + 3] * OWL_TILE);
        }
        for (; k < nnz; ++k) a0 += v[k] * owl_load(x0 + (int64_t)cols[k] * OWL_TILE);
        const owl_vf acc = (a0 + a1) + (a2 + a3) + b0;
        for (int u = 0; u < OWL_TB; ++u) y[(t + u) * n_out] = acc[u];
    }
    if (t < tn) {
        const int64_t rest = tn - t;
        float acc[OWL_TB];
        for (int u = 0; u < OWL_TB; ++u) acc[u] = 0.f;
        for (int64_t k = 0; k < nnz; ++k) {
            const float w = v[k];
            const float *xr = xb + (int64_t)cols[k] * OWL_TILE + t;
            for (int64_t u = 0; u < rest; ++u) acc[u] += w * xr[u];
        }
        for (int64_t u = 0; u < rest; ++u) y[(t + u) * n_out] = acc[u] + b0;
    }
}

/* cols: the column index of every nonzero (nnz int32, row by row, aligned with val);
   xb: scratch of C_in * OWL_TILE floats */
static void owl_mm_tiled(int64_t n_out, int64_t n_in, int64_t T, const int64_t *rp, const int32_t *cols,
                         const float *val, const float *x, const float *bias, float *y, float *xb) {
    for (int64_t t0 = 0; t0 < T; t0 += OWL_TILE) {
        const int64_t tn = T - t0 < OWL_TILE ? T - t0 : OWL_TILE;
        for (int64_t u = 0; u < tn; ++u)
            for (int64_t c = 0; c < n_in; ++c) xb[c * OWL_TILE + u] = x[(t0 + u) * n_in + c];
        for (int64_t r = 0; r < n_out; ++r)
            owl_row_tile(rp[r + 1] - rp[r], cols + rp[r], val + rp[r], tn, xb, bias ? bias[r] : 0.f,
                         y + t0 * n_out + r, n_out);
    }
}

/* cols_buf: scratch of nnz int32; xb: scratch of C_in * OWL_TILE floats */
void owl_csr_mm(int64_t n_out, int64_t n_in, int64_t T, const int64_t *rp, const uint16_t *col,
                const float *val, const float *x, const float *bias, float *y, int32_t *cols_buf, float *xb) {
    for (int64_t k = 0; k < rp[n_out]; ++k) cols_buf[k] = col[k];
    owl_mm_tiled(n_out, n_in, T, rp, cols_buf, val, x, bias, y, xb);
}

#ifdef __AVX512F__
/* Bitmask format: mask (C_out, C_in/16) uint16, vals = nonzeros row by row (padded by 16 zeros at the end),
   rp[r] = offset of row r's first value. x has C_in = 16 * n16 entries. */
void owl_bm_mv(int64_t n_out, int64_t n16, const uint16_t *mask, const int64_t *rp, const float *val,
               const float *x, const float *bias, float *y) {
    for (int64_t r = 0; r < n_out; ++r) {
        const uint16_t *m = mask + r * n16;
        const float *v = val + rp[r];
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 4 <= n16; j += 4) {
            const __mmask16 k0 = m[j], k1 = m[j + 1], k2 = m[j + 2], k3 = m[j + 3];
            const __m512 w0 = _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(v));
            v += __builtin_popcount(k0);
            const __m512 w1 = _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(v));
            v += __builtin_popcount(k1);
            const __m512 w2 = _mm512_maskz_expand_ps(k2, _mm512_loadu_ps(v));
            v += __builtin_popcount(k2);
            const __m512 w3 = _mm512_maskz_expand_ps(k3, _mm512_loadu_ps(v));
            v += __builtin_popcount(k3);
            acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * j), acc0);
            acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16 * j + 16), acc1);
            acc2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + 16 * j + 32), acc2);
            acc3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + 16 * j + 48), acc3);
        }
        for (; j < n16; ++j) {
            const __mmask16 k0 = m[j];
            const __m512 w0 = _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(v));
            v += __builtin_popcount(k0);
            acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * j), acc0);
        }
        acc0 = _mm512_add_ps(acc0, acc2);
        acc1 = _mm512_add_ps(acc1, acc3);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (bias ? bias[r] : 0.f);
    }
}

/* Several tokens with the bitmask format; cols_buf: scratch of nnz + 16 int32, xb of C_in * OWL_TILE. */
void owl_bm_mm(int64_t n_out, int64_t n_in, int64_t n16, int64_t T, const uint16_t *mask, const int64_t *rp,
               const float *val, const float *x, const float *bias, float *y, int32_t *cols_buf, float *xb) {
    /* column indices of all nonzeros, branch-free: compress the 16 lane indices of each group by its mask */
    int64_t n = 0;
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (int64_t r = 0; r < n_out; ++r) {
        const uint16_t *m = mask + r * n16;
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int64_t j = 0; j < n16; ++j) {
            const __mmask16 k0 = m[j];
            _mm512_storeu_si512((void *)(cols_buf + n), _mm512_maskz_compress_epi32(k0, idx));
            n += __builtin_popcount(k0);
            idx = _mm512_add_epi32(idx, sixteen);
        }
    }
    owl_mm_tiled(n_out, n_in, T, rp, cols_buf, val, x, bias, y, xb);
}
#endif
"""

_TILE = 64  # OWL_TILE in the C source
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-openmp", "-std=c11"]
_lib: Any = None


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def kernel_library(required: bool = True) -> Any:
    """Compile (once, cached) and load the C kernels; None when no compiler exists and not ``required``."""
    global _lib
    if _lib is not None:
        return _lib
    from owlctl.engine.models import cache_dir

    cc = _compiler()
    if cc is None:
        if required:
            raise ModelError("the owlctl sparse kernels need a C compiler (cc, gcc or clang) and none was found",
                             hint="install gcc, or use --sparse-kernel torch-csr")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([_C_SOURCE, " ".join(_FLAGS), version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"owlsparse-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            src = tmpdir / "owlsparse.c"
            src.write_text(_C_SOURCE)
            so = tmpdir / "owlsparse.so"
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(so)], capture_output=True, text=True)
            if proc.returncode != 0:
                if not required:
                    return None
                raise ModelError(f"compiling the owlctl sparse kernels failed:\n{proc.stderr.strip()[-2000:]}",
                                 hint="use --sparse-kernel torch-csr, or report this with your compiler version")
            os.replace(so, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.owl_has_avx512.restype = ctypes.c_int
    lib.owl_csr_mv.argtypes = [i64, p, p, p, p, p, p]
    lib.owl_csr_mm.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, p]
    lib.owl_csr_mv.restype = lib.owl_csr_mm.restype = None
    if lib.owl_has_avx512():
        lib.owl_bm_mv.argtypes = [i64, i64, p, p, p, p, p, p]
        lib.owl_bm_mm.argtypes = [i64, i64, i64, i64, p, p, p, p, p, p, p, p]
        lib.owl_bm_mv.restype = lib.owl_bm_mm.restype = None
    _lib = lib
    return lib


def resolve_kernel(kernel: str) -> str:
    """``auto`` -> bitmask (AVX-512), csr (other CPUs with a compiler) or torch-csr (no compiler)."""
    if kernel not in KERNELS:
        raise InputError(f"unknown sparse kernel {kernel!r}", hint="use one of: " + ", ".join(KERNELS))
    if kernel in ("torch-csr", "torch-bsr"):
        return kernel
    lib = kernel_library(required=kernel != "auto")
    if lib is None:
        return "torch-csr"
    if kernel == "auto":
        return "bitmask" if lib.owl_has_avx512() else "csr"
    if kernel == "bitmask" and not lib.owl_has_avx512():
        raise InputError("the bitmask kernel needs AVX-512, which this CPU (or compiler) lacks",
                         hint="use --sparse-kernel csr")
    return kernel


def _ptr(t: Any) -> int | None:
    return None if t is None else t.data_ptr()


def _make_module_class() -> Any:
    import torch
    import torch.nn as nn

    class SparseLinear(nn.Module):
        """A Linear whose weight is stored as its nonzeros only. Same inputs and outputs as nn.Linear."""

        def __init__(self, linear: nn.Linear, kernel: str) -> None:
            super().__init__()
            w = linear.weight.detach()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.kernel = kernel
            self.dtype = w.dtype
            self.nnz = int(torch.count_nonzero(w))
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                      requires_grad=False)
            own = kernel in ("bitmask", "csr")
            if own and w.dtype != torch.float32:
                raise InputError(f"the {kernel} kernel is float32 only; this weight is {w.dtype}",
                                 hint="use --dtype float32 or --sparse-kernel torch-csr")
            if kernel == "csr" and self.in_features > 65535:
                raise InputError("the csr kernel stores 16-bit column indices; C_in > 65535 here",
                                 hint="use --sparse-kernel torch-csr")
            nz = w != 0
            counts = nz.sum(1, dtype=torch.int64)
            rp = torch.zeros(self.out_features + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=rp[1:])
            if kernel == "csr":
                self.register_buffer("row_ptr", rp)
                self.register_buffer("cols", nz.nonzero()[:, 1].to(torch.int32).to(torch.uint16).contiguous())
                self.register_buffer("vals", w[nz].contiguous())
            elif kernel == "bitmask":
                pad = (-self.in_features) % 16
                nzp = torch.nn.functional.pad(nz, (0, pad)) if pad else nz
                self.n16 = nzp.shape[1] // 16
                bits = nzp.reshape(self.out_features, self.n16, 16).to(torch.int32)
                weights = (1 << torch.arange(16, dtype=torch.int32))
                mask = (bits * weights).sum(-1, dtype=torch.int32)  # lane c of group j = input 16j + c
                self.register_buffer("mask", mask.to(torch.uint16).contiguous())
                self.register_buffer("row_ptr", rp)
                # 16 zeros of padding: the kernel always loads 16 values starting at the row's next one
                self.register_buffer("vals", torch.cat([w[nz], torch.zeros(16, dtype=w.dtype)]).contiguous())
            elif kernel in ("torch-csr", "torch-bsr"):
                import warnings

                with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and only a comparison
                    warnings.simplefilter("ignore", UserWarning)
                    if kernel == "torch-csr":
                        self.weight_sparse = w.to_sparse_csr()
                    else:
                        bs = _bsr_block(self.out_features, self.in_features)
                        self.weight_sparse = w.to_sparse_bsr((bs, bs))
            else:
                raise InputError(f"unknown sparse kernel {kernel!r}")

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
                    f"density={self.nnz / (self.in_features * self.out_features):.3f}")

        def forward(self, x: Any) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, self.in_features)
            if self.kernel in ("torch-csr", "torch-bsr"):
                x2 = x2.to(self.dtype)
                if self.bias is None:
                    y = torch.sparse.mm(self.weight_sparse, x2.t()).t()
                else:
                    y = torch.addmm(self.bias.unsqueeze(1), self.weight_sparse, x2.t()).t()
                return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
            x2 = x2.to(torch.float32).contiguous()
            n_tok = x2.shape[0]
            lib = kernel_library()
            bias = _ptr(self.bias)
            if n_tok == 1:
                y = torch.empty(1, self.out_features, dtype=torch.float32)
                if self.kernel == "bitmask":
                    xv = x2 if self.n16 * 16 == self.in_features else \
                        torch.nn.functional.pad(x2, (0, self.n16 * 16 - self.in_features))
                    lib.owl_bm_mv(self.out_features, self.n16, _ptr(self.mask), _ptr(self.row_ptr),
                                  _ptr(self.vals), _ptr(xv), bias, _ptr(y))
                else:
                    lib.owl_csr_mv(self.out_features, _ptr(self.row_ptr), _ptr(self.cols), _ptr(self.vals),
                                   _ptr(x2), bias, _ptr(y))
            else:
                y = torch.empty(n_tok, self.out_features, dtype=torch.float32)
                cols = torch.empty(self.nnz + 16, dtype=torch.int32)  # column index of every nonzero
                xb = torch.empty(self.in_features * _TILE, dtype=torch.float32)  # one transposed token tile
                if self.kernel == "bitmask":
                    lib.owl_bm_mm(self.out_features, self.in_features, self.n16, n_tok, _ptr(self.mask),
                                  _ptr(self.row_ptr), _ptr(self.vals), _ptr(x2), bias, _ptr(y), _ptr(cols),
                                  _ptr(xb))
                else:
                    lib.owl_csr_mm(self.out_features, self.in_features, n_tok, _ptr(self.row_ptr),
                                   _ptr(self.cols), _ptr(self.vals), _ptr(x2), bias, _ptr(y), _ptr(cols), _ptr(xb))
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

        def stored_bytes(self) -> int:
            names = ("row_ptr", "cols", "vals", "mask")
            n = sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names if hasattr(self, k))
            if hasattr(self, "weight_sparse"):
                ws = self.weight_sparse
                n += sum(t.numel() * t.element_size() for t in (ws.values(), ws.crow_indices(), ws.col_indices()))
            return n

    return SparseLinear


def _bsr_block(rows: int, cols: int) -> int:
    for bs in (16, 8, 4, 2):
        if rows % bs == 0 and cols % bs == 0:
            return bs
    return 1


_SparseLinear: Any = None


def sparse_linear(linear: Any, kernel: str) -> Any:
    global _SparseLinear
    if _SparseLinear is None:
        _SparseLinear = _make_module_class()
    return _SparseLinear(linear, kernel)


def sparsify(model: Any, kernel: str = "auto", min_sparsity: float = 0.0) -> dict:
    """Swap every prunable Linear of ``model`` (family layout) for a SparseLinear, in place.

    Matrices below ``min_sparsity`` (fraction of zeros) stay dense. Returns counts and bytes for reporting.
    """
    import torch

    from owlctl.families import resolve

    layout = resolve(model)
    dtypes = {lin.weight.dtype for i in range(layout.num_blocks) for lin in layout.linears(i).values()}
    if kernel == "auto" and dtypes != {torch.float32}:
        kernel = "torch-csr"  # owlctl's C kernels are float32 only
    kernel = resolve_kernel(kernel)
    swapped = kept = 0
    dense_bytes = sparse_bytes = 0
    with torch.no_grad():
        for i in range(layout.num_blocks):
            block = layout.blocks[i]
            for name, lin in layout.linears(i).items():
                w = lin.weight
                zeros = 1.0 - int(torch.count_nonzero(w)) / w.numel()
                if zeros < min_sparsity or w.device.type != "cpu":
                    kept += 1
                    continue
                sl = sparse_linear(lin, kernel)
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, sl)
                swapped += 1
                dense_bytes += w.numel() * w.element_size()
                sparse_bytes += sl.stored_bytes()
    return {"kernel": kernel, "swapped": swapped, "kept_dense": kept, "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes}


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
