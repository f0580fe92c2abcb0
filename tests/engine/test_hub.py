"""Hub ids as people use them, without a network: a model in the Hugging Face cache is used offline and its
commit is recorded; --revision picks a snapshot; an id that is not cached fails at once with how to work
offline (no connection attempted when HF_HUB_OFFLINE is set); --trust-remote-code is recorded."""

from __future__ import annotations

import shutil
import socket

import pytest

from owlctl.errors import ModelError

SHA_A = "a" * 40
SHA_B = "b" * 40


@pytest.fixture
def hub_cache(tiny_llama, tmp_path, monkeypatch):
    """An HF cache holding org/tiny at two commits (main -> SHA_A), with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for sha in (SHA_A, SHA_B):
        shutil.copytree(tiny_llama, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("owlctl tried to connect although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_network)
    return repo


def test_cached_hub_model_is_used_offline_and_its_commit_recorded(hub_cache, text_file, tmp_path):
    from owlctl.ops.prune import PruneConfig, prune

    doc = prune(PruneConfig(model="org/tiny", output=tmp_path / "ck", method="magnitude", uniform=True,
                            target_sparsity=0.5, device="cpu"))
    assert doc["model"]["revision"] == SHA_A
    assert doc["model"]["path"] == str(hub_cache / "snapshots" / SHA_A)
    assert doc["model"]["trust_remote_code"] is False


def test_revision_selects_the_snapshot(hub_cache, text_file, tmp_path):
    from owlctl.ops.profile import ProfileConfig, profile

    doc = profile(ProfileConfig(model="org/tiny", revision=SHA_B, calib=str(text_file), nsamples=2, seqlen=16,
                                device="cpu", trust_remote_code=True))
    assert doc["model"]["revision"] == SHA_B
    assert doc["model"]["trust_remote_code"] is True


def test_uncached_id_fails_at_once_offline(hub_cache):
    from owlctl.engine.models import local_dir

    with pytest.raises(ModelError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as e:
        local_dir("org/missing")
    assert "HF_HUB_OFFLINE=1" in e.value.hint and "local model directory" in e.value.hint


def test_unreachable_hub_fails_at_once_with_the_offline_hint(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    import owlctl.engine.models.source as source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(source, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelError, match="the hub cannot be reached") as e:
        source.model_config("org/never-downloaded")
    assert "HF_HUB_OFFLINE=1" in e.value.hint


def test_reachability_probe_is_a_bounded_tcp_connect(monkeypatch):
    import owlctl.engine.models.source as source

    seen = {}

    def fake(addr, timeout):
        seen.update(addr=addr, timeout=timeout)
        raise OSError("unreachable")

    source._hub_reachable.cache_clear()
    monkeypatch.setattr(socket, "create_connection", fake)
    try:
        assert source._hub_reachable() is False
    finally:
        source._hub_reachable.cache_clear()
    assert seen["timeout"] <= 3.0 and seen["addr"][1] == 443
