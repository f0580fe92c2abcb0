"""owlctl's sparse kernels (owlctl/deploy/kernels): results against a float64 reference for every ISA, value
dtype, token count and thread count; the format against a naive loop; the build's integrity checks; the
fallback without a compiler; a sparsified tiny LLaMA against its dense self. No timing anywhere.

Tolerance (float32 accumulation): |y - ref| <= (C_in + 2) * 2^-24 * (|x| @ |W|^T + |b|), the worst-case
bound of any summation order of C_in float32 products (inputs and weights convert to float32 exactly) plus
the bias add. A 16-bit output adds its rounding: u * |ref| with u = 2^-8 (bfloat16) or 2^-11 (float16).
The dense route (16-bit weights, many tokens: torch's GEMM) rounds the product and then the bias sum, so it
is allowed two roundings; it is also checked bit for bit against torch's own F.linear.
"""

from __future__ import annotations

import copy
import os
import pickle
import stat
import subprocess
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from owlctl.deploy.kernels import ISAS, KERNELS, build
from owlctl.deploy.kernels import linear as kl
from owlctl.errors import InputError, ModelError, OwlctlError

ALL_ISAS = [i for i in ISAS if i != "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TOKENS = (1, 3, 17, 64, 130)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """The library is built once into this module's own cache (kept in `build`), and forgotten after."""
    saved = build._lib
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OWLCTL_CACHE", str(tmp_path_factory.mktemp("kernel-cache")))
        build.reset_for_tests()
        build.library()
        yield
    build._lib = saved


def _need(isa):
    """Skip (with the reason) a variant this CPU cannot run; all of them run on an AVX-512 + VBMI2 CPU."""
    if not build.library().owl_isa_supported(build.ISAS[isa]):
        pytest.skip(f"this CPU cannot run the {isa} variant")


ISA_PARAMS = ALL_ISAS


def _weight(out_f, in_f, density=0.3, seed=0):
    """Random weight with ~density nonzeros; row 0 empty, row 1 fully dense (when there are rows for it)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    w[0] = 0
    if out_f > 1:
        w[1] = torch.randn(in_f, generator=g)
    return w


def _linear(w, bias, dtype):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _assert_close(y, x, lin, roundings=1):
    w = lin.weight.detach().double()
    ref = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    if lin.bias is not None:
        ref = ref + lin.bias.detach().double()
        mag = mag + lin.bias.detach().double().abs()
    tol = (w.shape[1] + 2) * 2.0**-24 * mag
    if y.dtype != torch.float32:
        tol = tol + roundings * U_OUT[y.dtype] * (ref.abs() + tol) + 2.0**-24
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}, worst margin {float((err - tol).max()):.3g}"


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bias", [((37, 50), True), ((64, 130), False), ((130, 600), True), ((5, 1), False)])
def test_kernel_matches_float64_reference(isa, dtype, shape, bias):
    _need(isa)
    lin = _linear(_weight(*shape), bias, dtype)
    sl = kl.SparseLinear(lin, threads=1, isa=isa)
    sl.dense_from_tokens = None  # the sparse kernel at every token count (the dense route is tested below)
    xdtypes = [torch.float32] + ([dtype] if dtype != torch.float32 else [])
    with torch.inference_mode():
        for xdt in xdtypes:
            for tokens in TOKENS:
                x = torch.randn(2, tokens, shape[1]).to(xdt)  # leading batch dims
                outs = []
                for threads in (1, 2, 3):
                    sl.threads = threads
                    outs.append(sl(x))
                _assert_close(outs[0], x, lin)
                # each row is computed by one thread in a fixed order: bit-identical for any thread count
                assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_matrix_and_many_supertiles(isa, dtype):
    _need(isa)
    lin = _linear(torch.zeros(20, 70), True, dtype)
    sl = kl.SparseLinear(lin, threads=2, isa=isa)
    sl.dense_from_tokens = None
    assert sl.nnz == 0
    with torch.inference_mode():
        x = torch.randn(3, 70)
        assert torch.equal(sl(x), lin.bias.detach().float().expand(3, 20))
        lin2 = _linear(_weight(33, 90, seed=3), False, dtype)
        sl2 = kl.SparseLinear(lin2, threads=3, isa=isa)
        sl2.dense_from_tokens = None
        x = torch.randn(600, 90)  # three super-tiles of 256 tokens, the last one partial
        _assert_close(sl2(x), x, lin2)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_few_token_and_tile_kernels_agree(isa, dtype):
    """T = 2..9 use the few-token kernel, more tokens the tile kernel; force each at every T."""
    _need(isa)
    lin = _linear(_weight(70, 333, seed=8), True, dtype)
    sl = kl.SparseLinear(lin, threads=2, isa=isa)
    sl.dense_from_tokens = None
    lib = build.library()
    old = lib.owl_set_tile_from(10)
    try:
        with torch.inference_mode():
            for tokens in (2, 3, 5, 8, 9, 12, 20):
                x = torch.randn(tokens, 333)
                lib.owl_set_tile_from(1000)  # few-token kernel
                a = sl(x)
                lib.owl_set_tile_from(2)  # tile kernel
                b = sl(x)
                _assert_close(a, x, lin)
                _assert_close(b, x, lin)
    finally:
        lib.owl_set_tile_from(old)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_isas_agree_with_each_other(isa):
    """Different ISAs sum in different orders, so they agree to the tolerance, not bit for bit."""
    _need(isa)
    lin = _linear(_weight(48, 200, seed=5), True, torch.float32)
    x = torch.randn(1, 200)
    with torch.inference_mode():
        ref = kl.SparseLinear(lin, isa="portable")(x)
        got = kl.SparseLinear(lin, isa=isa)(x)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_route_for_many_tokens_with_16_bit_weights(dtype):
    lin = _linear(_weight(40, 72, seed=7), True, dtype)
    sl = kl.SparseLinear(lin, threads=2)
    assert sl.dense_from_tokens == kl.DENSE_FROM_TOKENS[dtype]  # CPU-dependent (AMX / AVX512-BF16)
    sl.dense_from_tokens = 16
    x = torch.randn(1, 40, 72).to(dtype)
    with torch.inference_mode():
        y = sl(x)
        _assert_close(y, x, lin, roundings=2)
        assert torch.equal(y, torch.nn.functional.linear(x, lin.weight, lin.bias))  # torch's own GEMM
        xf = x.float()  # float32 activations stay on the sparse kernel (no rounding to 16 bits)
        _assert_close(sl(xf), xf, lin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 50), (9, 64), (130, 600), (3, 1)])
def test_dense_weight_round_trip(dtype, shape):
    lin = _linear(_weight(*shape, seed=11), False, dtype)
    sl = kl.SparseLinear(lin, threads=3)
    assert torch.equal(sl.dense_weight(), lin.weight.detach())


def test_pack_bitmask_matches_naive_loop():
    w = _weight(9, 70, seed=2).to(torch.bfloat16)
    mask, vals, row_ptr = kl.pack_bitmask(w)
    ng = mask.shape[1]
    assert ng % 4 == 0 and ng * 16 >= 70 and mask.dtype == torch.int16
    words = mask.to(torch.int32) & 0xFFFF
    expect_vals, k = [], 0
    for r in range(9):
        assert int(row_ptr[r]) == k
        for c in range(ng * 16):
            bit = (int(words[r, c // 16]) >> (c % 16)) & 1
            nonzero = c < 70 and bool(w[r, c] != 0)
            assert bit == nonzero
            if nonzero:
                expect_vals.append(w[r, c])
                k += 1
    assert int(row_ptr[9]) == k and vals.dtype == torch.bfloat16
    assert torch.equal(vals[:k], torch.stack(expect_vals)) and bool((vals[k:] == 0).all()) and vals.numel() >= k + 32


def test_inconsistent_buffers_are_refused_before_any_read():
    sl = kl.SparseLinear(_linear(_weight(8, 32), False, torch.float32))
    state = sl.state_dict()
    state["row_ptr"] = state["row_ptr"].clone()
    state["row_ptr"][-1] += 1000  # offsets that point past the values
    sl.load_state_dict(state)
    with pytest.raises(ModelError, match="inconsistent"):
        sl(torch.randn(1, 32))


def test_module_behaves_like_linear():
    lin = _linear(_weight(24, 40, seed=4), True, torch.float32)
    sl = kl.SparseLinear(lin)
    assert sl.threads == kl.default_threads() and "kernel=bitmask" in repr(sl)
    assert sl.stored_bytes() < 24 * 40 * 4 and sl.nnz == int(torch.count_nonzero(lin.weight))
    with torch.inference_mode():
        x = torch.randn(40, 3).t()  # not contiguous
        _assert_close(sl(x), x.contiguous(), lin)
        assert sl(torch.randn(0, 40)).shape == (0, 24)
        x64 = torch.randn(2, 40, dtype=torch.float64)  # other float dtypes go through float32
        y64 = sl(x64)
        assert y64.dtype == torch.float64 and (y64 - lin(x64.float()).double()).abs().max() < 1e-4
        for clone in (copy.deepcopy(sl), pickle.loads(pickle.dumps(sl))):  # handles rebuilt, not shared
            assert torch.equal(clone(x), sl(x))
        half = copy.deepcopy(sl).to(torch.bfloat16)  # buffers converted: rebound with the new dtype
        xb = x.to(torch.bfloat16)
        _assert_close(half(xb), xb, copy.deepcopy(lin).to(torch.bfloat16))
    with pytest.raises(InputError, match="inference-only"):
        sl(torch.randn(2, 40, requires_grad=True))
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        kl.SparseLinear(torch.nn.Linear(4, 4).double())


def test_concurrent_python_threads_share_the_pool():
    lin = _linear(_weight(300, 256, seed=9), True, torch.float32)
    sl = kl.SparseLinear(lin, threads=2)
    xs = [torch.randn(t, 256) for t in (1, 5, 1, 70, 1, 2) * 3]
    with torch.inference_mode():
        expect = [sl(x) for x in xs]
        with ThreadPoolExecutor(4) as ex:  # ctypes drops the GIL: calls really overlap, the library serialises
            got = list(ex.map(sl, xs))
    assert all(torch.equal(a, b) for a, b in zip(expect, got))


def test_forked_child_restarts_the_pool():
    lin = _linear(_weight(50, 64, seed=1), False, torch.float32)
    sl = kl.SparseLinear(lin, threads=2)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        expect = sl(x)  # the pool's worker exists now; a forked child has none
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with torch.inference_mode():
                code = 0 if torch.equal(sl(x), expect) else 2
        finally:
            os._exit(code)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        import time

        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernel")
    assert os.waitstatus_to_exitcode(status) == 0


def test_unsupported_isa_is_an_input_error():
    class NoAvx:
        @staticmethod
        def owl_isa_supported(code):
            return code < build.ISAS["avx512"]

        @staticmethod
        def owl_isa_best():
            return build.ISAS["avx2"]

    with pytest.raises(InputError, match="cannot run the avx512 kernels") as e:
        kl.isa_code(NoAvx(), "avx512")
    assert "avx2" in e.value.hint
    with pytest.raises(InputError, match="unknown kernel ISA"):
        kl.resolve_kernel("bitmask", "sse9")


def test_kernel_names_and_aliases():
    from owlctl.options import SparseKernel

    assert tuple(k.value for k in SparseKernel) == KERNELS
    assert kl.resolve_kernel("csr") == ("bitmask", "portable")
    assert kl.resolve_kernel("bitmask-avx2") == ("bitmask", "avx2")
    assert kl.resolve_kernel("torch-bsr") == ("torch-bsr", "")
    assert kl.resolve_kernel("auto")[0] == "bitmask"
    with pytest.raises(InputError, match="unknown sparse kernel"):
        kl.resolve_kernel("magic")


def test_read_bandwidth_probe():
    r = __import__("owlctl.deploy.kernels.probe", fromlist=["read_bandwidth"]).read_bandwidth(1 << 22, 2, 3)
    assert r["best_bytes_per_s"] > 0 and len(r["seconds"]) == 3 and all(s > 0 for s in r["seconds"])
    assert r["threads"] == 2 and r["isa"] in ALL_ISAS


# ------------------------------------------------------------------ the tiny LLaMA, dense vs sparsified


def _pruned_tiny_llama(dtype):
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    from owlctl.families import resolve

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    layout = resolve(model)
    with torch.no_grad():  # 70% unstructured magnitude pruning per matrix
        for i in range(layout.num_blocks):
            for lin in layout.linears(i).values():
                w = lin.weight
                k = int(0.7 * w.numel())
                thresh = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > thresh)
    return model.to(dtype)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_sparsified_tiny_llama_logits_equal_dense(isa, dtype, tol):
    """bf16: both models round every activation to bfloat16, and one differing rounding propagates through
    three blocks; 0.1 on logits of magnitude ~1-4 (measured max ~0.03)."""
    _need(isa)
    dense = _pruned_tiny_llama(dtype)
    sparse = copy.deepcopy(dense)
    info = kl.sparsify(sparse, "bitmask", threads=2, isa=isa)
    assert (info["kernel"], info["isa"], info["threads"], info["swapped"]) == ("bitmask", isa, 2, 3 * 7)
    assert info["sparse_bytes"] < 0.45 * info["dense_bytes"]
    ids = torch.randint(0, 260, (2, 40))  # 40 tokens: the bf16 Linears take the dense route for the prompt
    with torch.inference_mode():
        a, b = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
        assert (a - b).abs().max() < tol
        one = ids[:1, :1]  # one token: the decode kernel
        assert (dense(input_ids=one).logits.float() - sparse(input_ids=one).logits.float()).abs().max() < tol


# ------------------------------------------------------------------ build: integrity and fallback


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A new OWLCTL_CACHE holding a copy of the module's build (same key: loads without compiling) and a
    forgotten library; the module's library is restored afterwards."""
    import shutil

    saved = build._lib
    kdir = tmp_path / "cache" / "kernels"
    shutil.copytree(build.kernels_dir(), kdir, ignore=shutil.ignore_patterns(".lock", ".build-*"))
    os.chmod(kdir, 0o700)
    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path / "cache"))
    build.reset_for_tests()
    yield kdir
    build._lib = saved


def _artifacts(kdir):
    sos = sorted(kdir.glob("owlsparse-*.so"))
    assert len(sos) == 1
    return sos[0], sos[0].with_suffix(".json")


def _stub_library(tmp_path, marker):
    """A shared library whose constructor writes `marker`: loading it would be visible."""
    src = tmp_path / "stub.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
        }}
        int owl_abi(void) {{ return {build.ABI}; }}
    """))
    out = tmp_path / "stub.so"
    subprocess.run([build.find_compiler()[0], "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out


def test_kernels_dir_is_created_private(fresh_cache):
    import shutil

    shutil.rmtree(fresh_cache)
    assert build.private_dir() == fresh_cache
    assert stat.S_IMODE(os.stat(fresh_cache).st_mode) == 0o700 and os.stat(fresh_cache).st_uid == os.getuid()


def test_library_without_manifest_is_rebuilt_not_loaded(fresh_cache, tmp_path):
    """Also checks what a build writes: private files, a manifest with the library's sha256."""
    import hashlib
    import json

    so, manifest = _artifacts(fresh_cache)
    marker = tmp_path / "planted-ran"
    os.replace(_stub_library(tmp_path, marker), so)  # a library nobody vouched for
    manifest.unlink()
    lib = build.library()  # rebuilt: compiles
    assert lib.owl_isa_best() >= 0 and not marker.exists()
    for p in (so, manifest):
        assert os.stat(p).st_uid == os.getuid() and not os.stat(p).st_mode & 0o022
    doc = json.loads(manifest.read_text())
    assert doc["schema"] == build.MANIFEST_SCHEMA and doc["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    assert doc["flags"] == list(build.FLAGS) and doc["source_sha256"] and doc["compiler_version"]
    assert "-march=native" not in build.FLAGS
    mtime = so.stat().st_mtime_ns
    build.reset_for_tests()
    build.library()  # second load: verified, not rebuilt
    assert _artifacts(fresh_cache) == (so, manifest) and so.stat().st_mtime_ns == mtime
    so.unlink()  # a manifest without its library: rebuilt as well
    build.reset_for_tests()
    build.library()
    assert so.is_file() and json.loads(manifest.read_text())["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()


def test_planted_library_is_refused_and_never_runs(fresh_cache, tmp_path):
    so, _manifest = _artifacts(fresh_cache)
    marker = tmp_path / "planted-ran"
    os.replace(_stub_library(tmp_path, marker), so)  # same name, different bytes, the old manifest
    with pytest.raises(build.KernelIntegrityError, match="differs from") as e:
        build.library()
    assert str(so) in e.value.message and "OWLCTL_CACHE" in e.value.hint
    assert not marker.exists()
    with pytest.raises(build.KernelIntegrityError):  # `auto` does not quietly fall back either
        kl.resolve_kernel("auto")


def test_group_writable_directory_is_refused(fresh_cache):
    os.chmod(fresh_cache, 0o770)
    with pytest.raises(build.KernelIntegrityError, match="group- or world-writable") as e:
        build.library()
    assert str(fresh_cache) in e.value.message


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
@pytest.mark.parametrize("which", ["library", "manifest", "directory"])
def test_files_owned_by_another_user_are_refused(fresh_cache, which):
    so, manifest = _artifacts(fresh_cache)
    os.chown({"library": so, "manifest": manifest, "directory": fresh_cache}[which], 12345, -1)
    with pytest.raises(build.KernelIntegrityError, match="owned by uid 12345"):
        build.library()


def test_symlinked_library_is_refused(fresh_cache, tmp_path):
    so, _ = _artifacts(fresh_cache)
    elsewhere = tmp_path / "elsewhere.so"
    os.replace(so, elsewhere)
    os.symlink(elsewhere, so)
    with pytest.raises(build.KernelIntegrityError, match="symbolic link"):
        build.library()


def test_no_compiler_auto_falls_back_explicit_errors(fresh_cache, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(empty))
    assert build.find_compiler() is None
    with pytest.warns(UserWarning, match="falling back to torch's CSR"):
        assert kl.resolve_kernel("auto") == ("torch-csr", "")
    with pytest.raises(build.KernelUnavailableError, match="need a C compiler") as e:
        kl.resolve_kernel("bitmask")
    assert isinstance(e.value, OwlctlError) and "torch-csr" in e.value.hint
    model = _pruned_tiny_llama(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = kl.sparsify(model, "auto")
    assert info["kernel"] == "torch-csr" and "compiler" in info["fallback"]


def test_source_ships_as_package_data():
    assert build.SOURCE.is_file() and build.SOURCE.name == "owlsparse.c"
    root = Path(__file__).resolve().parents[2]
    text = (root / "pyproject.toml").read_text()
    assert '"owlctl.deploy.kernels" = ["owlsparse.c"]' in text


def test_bench_passes_threads_and_forced_isa(pruned_tiny):
    from owlctl.ops.bench import BenchConfig, bench

    doc = bench(BenchConfig(model=str(pruned_tiny(0.7)), backend="torch-sparse", prompt_len=8, new_tokens=3, runs=3,
                            threads=2, sparse_kernel="bitmask-portable"))
    sparse = doc["rows"][1]
    assert sparse["kernel"] == "bitmask" and sparse["max_abs_diff_vs_torch"] < 1e-4
    info = sparse["details"]["sparse"]
    assert (info["isa"], info["threads"]) == ("portable", 2)
    with pytest.raises(InputError, match="unknown sparse kernel"):
        bench(BenchConfig(model=str(pruned_tiny(0.7)), backend="torch-sparse", sparse_kernel="bitmask-sse9"))
