"""The host side of the DeepSparse backend: its venv (setup and checks) and the worker subprocess.

DeepSparse 1.8.0 (the last working release; 1.9.0 wheels are end-of-life stubs) needs Python < 3.12,
numpy < 2, onnx < 1.15 and sparsezoo==1.8.1, and breaks ``datasets`` unless pyarrow < 26, so it cannot share
owlctl's environment. ``setup_deepsparse`` builds a separate venv in the owlctl cache; ``run_worker`` starts
``deepsparse_worker.py`` with that venv's Python and exchanges one JSON document each way. DeepSparse's licence
(Neural Magic community licence) allows evaluation only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from owlctl.errors import ModelError

DEEPSPARSE_PINS = ("deepsparse==1.8.0", "sparsezoo==1.8.1", "numpy<2", "onnx<1.15", "pyarrow<26")
SETUP_MARKER = ".owlctl-setup-complete"
SETUP_HINT = "create it with `owlctl bench --cpu --setup` (a separate venv; DeepSparse's licence allows " \
             "evaluation only), or point to one with --deepsparse-python PATH"
WORKER = Path(__file__).resolve().parent / "deepsparse_worker.py"


def cpu_info() -> dict:
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": name, "logical_cpus": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags}


def deepsparse_venv() -> Path:
    from owlctl.engine.models import cache_dir

    return cache_dir() / "deepsparse-venv"


def deepsparse_python(explicit: str | Path | None = None) -> Path:
    """The DeepSparse venv's python, checked (exists, AVX2 CPU, Linux x86-64)."""
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ModelError(f"DeepSparse runs on Linux x86-64 only (this is {platform.system()} {platform.machine()})",
                         hint="use --backend torch-sparse, the maintained sparse CPU path")
    info = cpu_info()
    if not info["avx2"]:
        raise ModelError("DeepSparse needs a CPU with AVX2 (or AVX-512); /proc/cpuinfo lists no avx2 flag",
                         hint="use --backend torch-sparse, the maintained sparse CPU path")
    from owlctl.deploy.trust import check_private, check_recorded

    if explicit:
        py = Path(explicit)
        if not py.is_file():
            raise ModelError(f"DeepSparse is not installed (no Python at {py})", hint=SETUP_HINT)
        check_private(py.resolve(), what="the DeepSparse interpreter")
        return py
    venv = deepsparse_venv()
    py = venv / "bin" / "python"
    if not py.is_file():
        raise ModelError(f"DeepSparse is not installed (no Python at {py})", hint=SETUP_HINT)
    marker = _read_marker(venv)
    if marker is None:
        raise ModelError(f"the DeepSparse venv at {venv} is incomplete (an interrupted setup, or made by an older "
                         "owlctl)", hint=SETUP_HINT)
    from owlctl.engine.models import cache_dir

    # the venv, its bin/ and marker private to this user; the interpreter the one recorded at setup
    for p in (venv / SETUP_MARKER, venv / "bin"):
        check_private(p, root=cache_dir(), what="the DeepSparse venv")
    check_private(py, root=cache_dir(), what="the DeepSparse interpreter")
    real = py.resolve()
    check_private(real, what="the DeepSparse interpreter")
    check_recorded(real, marker.get("python_sha256"), "the DeepSparse interpreter")
    return py


def _read_marker(venv: Path) -> dict | None:
    try:
        doc = json.loads((venv / SETUP_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "python_sha256" in doc else None


def _find_python_for_deepsparse() -> str:
    """A Python < 3.12 to build the venv with (DeepSparse 1.8.0 has no wheels for 3.12+)."""
    import shutil

    if sys.version_info < (3, 12):
        return sys.executable
    for name in ("python3.11", "python3.10", "python3.9"):
        p = shutil.which(name)
        if p:
            return p
    raise ModelError("DeepSparse 1.8.0 needs Python 3.8-3.11, and none was found on PATH",
                     hint="install python3.11 (with venv), then re-run `owlctl bench --cpu --setup`")


def setup_deepsparse(log: Callable[[str], None] = lambda s: None) -> dict:
    """Create the DeepSparse venv (python -m venv + pinned pip install). Returns its python and versions.

    The venv is built in place (its scripts hard-code their path) and marked complete only at the end; a
    failed setup removes it."""
    import shutil

    venv = deepsparse_venv()
    base = _find_python_for_deepsparse()
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    py = venv / "bin" / "python"
    steps = [[base, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(py), "-m", "pip", "install", "-q", *DEEPSPARSE_PINS],
             [str(py), "-c", "import deepsparse, sys; print(deepsparse.__version__); print(sys.version.split()[0])"]]
    out = ""
    try:
        for cmd in steps:
            log("$ " + " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ModelError(f"DeepSparse setup failed at `{' '.join(cmd[2:5])}`:\n"
                                 f"{proc.stderr.strip()[-1500:]}",
                                 hint="check access to PyPI and that this Python has the venv module; the pins "
                                      "are " + " ".join(DEEPSPARSE_PINS) + " (see docs/bench.md)")
            out = proc.stdout
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    from owlctl.deploy.trust import sha256

    os.chmod(venv, 0o700)
    marker = {"pins": list(DEEPSPARSE_PINS), "python": str(py.resolve()), "python_sha256": sha256(py.resolve())}
    (venv / SETUP_MARKER).write_text(json.dumps(marker) + "\n")
    lines = out.strip().splitlines()
    return {"python": str(py), "deepsparse": lines[0] if lines else None,
            "python_version": lines[1] if len(lines) > 1 else None, "pins": list(DEEPSPARSE_PINS)}


def run_worker(py: Path, request: dict, threads: int) -> dict:
    """Run the worker with DeepSparse pinned to ``threads`` cores (NM_BIND_THREADS_TO_CORES=1: in our
    measurements DeepSparse was only fast with threads bound to cores). Returns the worker's document."""
    env = dict(os.environ, NM_BIND_THREADS_TO_CORES="1")
    proc = subprocess.run([str(py), str(WORKER)], input=json.dumps(request), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "runs" not in res:
        why = res.get("error") or proc.stderr.strip()[-1500:] or f"exit {proc.returncode}"
        raise ModelError(f"the DeepSparse worker failed: {why}", hint=SETUP_HINT if "import" in why else
                         "run with OWLCTL_DEBUG=1 and see docs/bench.md for the versions known to work")
    return res
