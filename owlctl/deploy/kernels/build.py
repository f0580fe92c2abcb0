"""Compile ``owlsparse.c`` once into the owlctl cache and load it only after checking it is ours, unchanged.

The library is built with the system C compiler (``$CC``, else cc, gcc, clang) and these flags, with no
``-march``: each ISA variant in the source carries its own target attribute and is chosen at run time.
It lands in ``cache_dir()/kernels/owlsparse-<key>.so``, key = sha256 of (source, flags, the compiler's
``--version``), next to a manifest ``owlsparse-<key>.json`` that records the library's sha256 and the key's
inputs. Builds go to a temporary file renamed into place, under a lock, so concurrent processes never
see half a library.

Loading a shared library runs its code, and the key is computable by anyone, so with a shared
``OWLCTL_CACHE`` / ``XDG_CACHE_HOME`` a planted file would run as the user. Before ``ctypes.CDLL``:
  - the kernels directory is created 0700 and must be a real directory owned by the current user and not
    group/world-writable; the library and the manifest must be regular files (not symlinks) with the same
    owner and no group/world write bit;
  - the library's sha256 must equal the manifest's. The file is opened once and the same descriptor is
    hashed, checked and loaded (``/proc/self/fd/N`` on Linux), so it cannot be swapped in between;
  - a library without a manifest (or a manifest without its library) is rebuilt, never loaded.
A failed check raises ``KernelIntegrityError`` naming the path and the fix (remove it, fix permissions,
or use a private ``OWLCTL_CACHE``); it is never silently skipped. A missing compiler or a failed build
raises ``KernelUnavailableError``; callers that asked for ``auto`` fall back to torch's own kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from owlctl.deploy.trust import UntrustedFileError
from owlctl.errors import OwlctlError

SOURCE = Path(__file__).with_name("owlsparse.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-std=gnu11", "-ffp-contract=fast", "-fvisibility=hidden",
         "-Wno-psabi")
ABI = 2  # OWL_ABI in owlsparse.c
MANIFEST_SCHEMA = "owlctl.kernel/1"
ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512vbmi2": 3}

_lock = threading.Lock()
_lib: Any = None


class KernelUnavailableError(OwlctlError):
    """owlctl's C kernels cannot be built here (no compiler, or the build failed)."""


class KernelIntegrityError(UntrustedFileError):
    """A cached kernel library or its directory fails the ownership / permission / hash checks."""


def find_compiler() -> list[str] | None:
    """The compiler command ($CC may carry arguments, e.g. ``ccache gcc``), or None when there is none."""
    env = os.environ.get("CC")
    candidates = [shlex.split(env)] if env and env.strip() else []
    candidates += [["cc"], ["gcc"], ["clang"]]
    for cmd in candidates:
        exe = shutil.which(cmd[0])
        if exe:
            return [exe, *cmd[1:]]
    return None


def kernels_dir() -> Path:
    from owlctl.engine.models import cache_dir

    return cache_dir() / "kernels"


def _fix_hint(path: Path) -> str:
    return (f"remove it (rm -rf {path}) or fix its owner/permissions (chmod go-w), or point OWLCTL_CACHE at a "
            "private directory")


def _check_private(st: os.stat_result, path: Path, want_dir: bool) -> None:
    from owlctl.deploy.trust import check_stat

    check_stat(st, path, "sparse-kernel", want_dir=want_dir, allow_root=False, error=KernelIntegrityError,
               hint=_fix_hint(path))


def private_dir() -> Path:
    """The kernels directory, created 0700 if missing, after the ownership and permission checks."""
    d = kernels_dir()
    if not os.path.lexists(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # another process made it: checked below like any other
    _check_private(os.lstat(d), d, want_dir=True)
    return d


def _open_checked(path: Path) -> int:
    """An O_NOFOLLOW descriptor of a private regular file (the checks are made on the open file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            _check_private(os.lstat(path), path, want_dir=False)
        raise KernelIntegrityError(f"cannot open {path}: {e.strerror}", hint=_fix_hint(path)) from None
    try:
        _check_private(os.fstat(fd), path, want_dir=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _key_inputs(cc: list[str]) -> dict:
    proc = subprocess.run([*cc, "--version"], capture_output=True, text=True)
    return {"source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "flags": list(FLAGS),
            "compiler": cc, "compiler_version": proc.stdout.strip(), "abi": ABI}


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _compile(cc: list[str], d: Path, so: Path, manifest: Path, inputs: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=d))  # 0700, inside the checked directory
    try:
        out = tmp / "owlsparse.so"
        proc = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelUnavailableError(
                f"compiling the owlctl sparse kernels failed ({' '.join(cc)}):\n{proc.stderr.strip()[-2000:]}",
                hint="use --sparse-kernel torch-csr, or report this with your compiler version")
        os.chmod(out, 0o700)
        doc = {"schema": MANIFEST_SCHEMA, "file": so.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
               "key": so.stem.split("-", 1)[1], **inputs}
        mtmp = tmp / "manifest.json"
        mtmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.chmod(mtmp, 0o600)
        os.replace(out, so)  # the library first: a crash in between leaves no manifest, so a rebuild
        os.replace(mtmp, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verified_fd(so: Path, manifest: Path) -> int:
    """Descriptor of the library after the manifest and hash checks (KernelIntegrityError otherwise)."""
    mfd = _open_checked(manifest)
    try:
        raw = b""
        while chunk := os.read(mfd, 1 << 16):
            raw += chunk
    finally:
        os.close(mfd)
    try:
        doc = json.loads(raw)
        want = doc["sha256"]
        assert doc.get("schema") == MANIFEST_SCHEMA and isinstance(want, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise KernelIntegrityError(f"the kernel manifest {manifest} is not an {MANIFEST_SCHEMA} document",
                                   hint=_fix_hint(manifest)) from None
    fd = _open_checked(so)
    from owlctl.deploy.trust import sha256_fd

    got = sha256_fd(fd)
    if got != want:
        os.close(fd)
        raise KernelIntegrityError(f"refusing {so}: its sha256 {got[:16]}... differs from the {want[:16]}... "
                                   f"recorded in {manifest.name} when it was built (modified or planted)",
                                   hint=_fix_hint(so))
    return fd


def _dlopen_fd(fd: int, so: Path) -> Any:
    proc_path = f"/proc/self/fd/{fd}"
    return ctypes.CDLL(proc_path if os.path.exists(proc_path) else str(so))


def _bind(lib: Any) -> Any:
    p, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    sigs = {
        "owl_abi": ([], i32), "owl_isa_supported": ([i32], i32), "owl_isa_best": ([], i32),
        "owl_has_avx512": ([], i32),
        "owl_set_threads": ([i32], i32), "owl_get_threads": ([], i32), "owl_set_spin_us": ([i32], None),
        "owl_max_threads": ([], i32), "owl_mat_size": ([], i64), "owl_set_tile_from": ([i32], i32),
        "owl_mat_init": ([p, i64, i64, i64, i32, p, p, i64, p, p, i32], i32),
        "owl_linear": ([p, p, p, i64, i32, i32, i32, i32], i32), "owl_densify": ([p, p, i64, i64, i32], i32),
        "owl_read_bandwidth": ([i64, i32, i32, i32, p], dbl), "owl_release_scratch": ([], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.owl_abi() != ABI:
        raise KernelUnavailableError(f"the kernel library reports ABI {lib.owl_abi()}, owlctl expects {ABI}",
                                     hint=f"remove {kernels_dir()} so it is rebuilt")
    return lib


def library() -> Any:
    """The loaded kernel library (built on first use). Raises KernelUnavailableError / KernelIntegrityError."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            _lib = _bind(_build_and_load())
    return _lib


def _build_and_load() -> Any:
    cc = find_compiler()
    if cc is None:
        raise KernelUnavailableError("owlctl's sparse kernels need a C compiler ($CC, cc, gcc or clang) and none "
                                     "was found", hint="install gcc (or set CC), or use --sparse-kernel torch-csr")
    inputs = _key_inputs(cc)
    d = private_dir()
    key = _key(inputs)
    so, manifest = d / f"owlsparse-{key}.so", d / f"owlsparse-{key}.json"
    with _dir_lock(d):
        if not os.path.lexists(manifest) or not os.path.lexists(so):
            _compile(cc, d, so, manifest, inputs)  # never load a library nobody vouched for: rebuild it
        fd = _verified_fd(so, manifest)
        try:
            return _dlopen_fd(fd, so)
        finally:
            os.close(fd)


class _dir_lock:
    """flock on kernels/.lock: one process builds while the others wait, then load what it built."""

    def __init__(self, d: Path) -> None:
        self.path = d / ".lock"
        self.fd = -1

    def __enter__(self) -> "_dir_lock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): builds still rename atomically
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the lock


def available() -> tuple[bool, str | None]:
    """(True, None) when the library loads, else (False, why) for KernelUnavailableError; integrity errors
    propagate (a planted library is a problem to report, not a reason to fall back quietly)."""
    try:
        library()
    except KernelUnavailableError as e:
        return False, e.message
    return True, None


def reset_for_tests() -> None:
    """Forget the loaded library so the next ``library()`` redoes the checks (tests only: a loaded library
    stays mapped in the process)."""
    global _lib
    _lib = None
