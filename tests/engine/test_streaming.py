"""Streaming a model from its files (--offload disk) gives the same answers as holding it in memory
(--offload none): the same forward for every family, the same profile, bit-identical checkpoints for every
method and allocation, the same perplexity and audit; checkpoints written tensor by tensor load in plain
transformers, sharded or not, with tied embeddings; pickle-only models are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import assert_same_weights, checkpoint_tensors

from owlctl.engine.models.hosts import Streamed
from owlctl.errors import ModelError
from owlctl.ops.profile import ProfileConfig, profile
from owlctl.ops.prune import PruneConfig, prune

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox",
            "gemma3_text-hybrid", "llama-tied"]
CAL = dict(nsamples=4, seqlen=32, device="cpu", batch_size=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_from_pretrained(tiny_models, family):
    """Every block materialised from the files, then the model's own forward: the logits of from_pretrained."""
    from transformers import AutoModelForCausalLM

    path = tiny_models(family)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    host = Streamed(path)
    assert {p.device.type for p in host.model.parameters()} == {"meta"}
    ids = torch.randint(0, 250, (2, 24))
    with host.outside("cpu", head=True):
        mods = [m for i in range(host.layout.num_blocks) for m in host.layout.blocks[i].modules()]
        host.materialise(mods, "cpu")
        with torch.no_grad():
            assert torch.equal(host.model(ids).logits, ref(ids).logits)
        host.release(mods)
    assert {p.device.type for p in host.model.parameters()} == {"meta"}  # nothing kept after the context


@pytest.mark.parametrize("family", ["llama", "gemma3_text-hybrid", "gpt_neox", "opt"])
def test_streamed_profile_equals_in_memory(tiny_models, text_file, tmp_path, family):
    docs = {}
    for off in ("none", "disk"):
        docs[off] = profile(ProfileConfig(model=str(tiny_models(family)), output=tmp_path / f"{off}.json",
                                          calib=str(text_file), offload=off, **CAL))
    assert docs["none"]["blocks"] == docs["disk"]["blocks"]


@pytest.mark.parametrize("method,alloc", [("magnitude", "uniform"), ("wanda", "uniform"), ("sparsegpt", "uniform"),
                                          ("wanda", "owl"), ("sparsegpt", "owl"), ("wanda", "nm")])
def test_streamed_checkpoint_is_bit_identical(tiny_models, text_file, tmp_path, method, alloc):
    model = tiny_models("llama")
    kw: dict = dict(uniform=True, target_sparsity=0.6)
    if alloc == "owl":
        prof = tmp_path / "p.json"
        profile(ProfileConfig(model=str(model), output=prof, calib=str(text_file), **CAL))
        kw = dict(from_profile=prof, target_sparsity=0.6, lam=0.1)
    elif alloc == "nm":
        kw = dict(uniform=True, pattern="2:4")
    out = {}
    for off in ("none", "disk"):
        out[off] = tmp_path / off
        prune(PruneConfig(model=str(model), output=out[off], method=method, calib=str(text_file), offload=off,
                          **kw, **CAL))
    assert_same_weights(out["none"], out["disk"])
    assert checkpoint_tensors(out["none"]).keys() == checkpoint_tensors(model).keys()  # the source's tensor names, nothing more
    rep = [json.loads((out[o] / "owlctl-report.json").read_text())["blocks"] for o in ("none", "disk")]
    assert rep[0] == rep[1]


@pytest.mark.parametrize("family", ["gemma3_text-hybrid", "gpt_neox", "llama-tied"])
def test_streamed_prune_of_other_families_loads_in_transformers(tiny_models, text_file, tmp_path, family):
    """Tied embeddings are stored once, GPT-NeoX keeps its checkpoint name (embed_out), and the result loads."""
    from transformers import AutoModelForCausalLM

    src = tiny_models(family)
    out = {}
    for off in ("none", "disk"):
        out[off] = tmp_path / off
        prune(PruneConfig(model=str(src), output=out[off], method="wanda", uniform=True, target_sparsity=0.5,
                          calib=str(text_file), offload=off, **CAL))
    assert_same_weights(out["none"], out["disk"])
    assert sorted(checkpoint_tensors(out["disk"])) == sorted(checkpoint_tensors(src))
    m = AutoModelForCausalLM.from_pretrained(out["disk"]).eval()
    q = m.get_submodule(f"{'gpt_neox' if family == 'gpt_neox' else 'model'}.layers.0").mlp
    lin = q.dense_h_to_4h if family == "gpt_neox" else q.up_proj
    assert float((lin.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_sharded_checkpoint_loads_and_matches(tiny_llama, text_file, tmp_path, monkeypatch):
    """With small shards the writer produces model-0000N-of-0000M files and the index transformers reads."""
    from transformers import AutoModelForCausalLM

    import owlctl.formats.shards as shards

    monkeypatch.setattr(shards, "DEFAULT_MAX_SHARD_BYTES", 60_000)
    out = tmp_path / "sharded"
    prune(PruneConfig(model=str(tiny_llama), output=out, method="wanda", uniform=True, target_sparsity=0.5,
                      calib=str(text_file), offload="disk", **CAL))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    tensors = checkpoint_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    m = AutoModelForCausalLM.from_pretrained(out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, tensors[k])
    for f in out.glob("*.safetensors"):  # owlctl's metadata in every shard
        with safe_open(str(f), "pt") as h:
            assert "owlctl.allocation" in h.metadata()


def test_streamed_rewrite_copies_nothing_twice(tiny_llama, text_file, tmp_path):
    """The metadata is in the header from the start: no weight file is rewritten (one inode, never replaced)."""
    from owlctl.formats.checkpoint import read_checkpoint_records

    out = tmp_path / "ck"
    prune(PruneConfig(model=str(tiny_llama), output=out, method="magnitude", uniform=True, target_sparsity=0.5,
                      offload="disk", device="cpu"))
    rec = read_checkpoint_records(out)
    assert rec["allocation"]["params"]["allocator"] == "uniform"
    assert not list(out.glob("*.tmp")) and not list(out.parent.glob(".ck.partial*"))


@pytest.mark.parametrize("place", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_checkpoint(tiny_llama, text_file, tmp_path, place):
    out = {}
    for p in ("device", place):
        out[p] = tmp_path / p
        prune(PruneConfig(model=str(tiny_llama), output=out[p], method="sparsegpt", uniform=True,
                          target_sparsity=0.5, calib=str(text_file), offload="disk", offload_activations=p, **CAL))
    assert_same_weights(out["device"], out[place])


def test_disk_activations_are_removed(tiny_llama, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    prune(PruneConfig(model=str(tiny_llama), output=tmp_path / "ck", method="wanda", uniform=True,
                      target_sparsity=0.5, calib=str(text_file), offload="disk", offload_activations="disk", **CAL))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_streamed_eval_equals_in_memory(pruned_tiny, text_file):
    from owlctl.ops.evaluate import EvalConfig, evaluate

    docs = {off: evaluate(EvalConfig(model=str(pruned_tiny(0.5)), data=(str(text_file),), split="validation",
                                     seqlen=32, max_windows=6, batch_size=2, offload=off, device="cpu"))
            for off in ("none", "disk")}
    a, b = (docs[o]["perplexity"][str(text_file)] for o in ("none", "disk"))
    assert a["windows"] == b["windows"] == 6 and a["windows_sha256"] == b["windows_sha256"]
    assert b["window_nll"] == pytest.approx(a["window_nll"], rel=1e-6, abs=1e-6)
    assert docs["none"]["audit"]["blocks"] == docs["disk"]["audit"]["blocks"]
    assert docs["disk"]["audit"]["status"] == "ok"


def test_streamed_pipeline_equals_in_memory(tiny_llama, text_file):
    from owlctl.ops.pipeline import PipelineConfig, pipeline

    docs = {off: pipeline(PipelineConfig(model=str(tiny_llama), calib=str(text_file), nsamples=4, seqlen=32,
                                         eval_data=str(text_file), eval_seqlen=32, max_windows=4, device="cpu",
                                         offload=off))
            for off in ("none", "disk")}
    for ra, rb in zip(docs["none"]["results"], docs["disk"]["results"]):
        (sa, pa), = ra["perplexity"].items()
        (_, pb), = rb["perplexity"].items()
        assert pb["ppl"] == pytest.approx(pa["ppl"], rel=1e-6), ra["variant"]
        assert ra["realised_sparsity"] == rb["realised_sparsity"]


def test_pickle_only_model_is_refused_without_unpickling(tiny_llama, tmp_path):
    import shutil

    d = tmp_path / "bin-model"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle: if this were unpickled it would fail differently")
    for off in ("none", "disk"):
        with pytest.raises(ModelError, match="pickle") as e:
            prune(PruneConfig(model=str(d), output=tmp_path / f"o-{off}", method="magnitude", uniform=True,
                              target_sparsity=0.5, offload=off, device="cpu"))
        assert "save_pretrained" in e.value.hint


def test_auto_offload_streams_when_the_model_is_large_for_the_memory(tiny_llama, monkeypatch):
    import owlctl.engine.memory as memory
    from owlctl.engine.models.load import choose_offload, weights_nbytes

    size = weights_nbytes(tiny_llama)
    assert size == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors")) - _header_bytes(tiny_llama)
    monkeypatch.setattr(memory, "available_bytes", lambda: size * 2)
    assert choose_offload("auto", tiny_llama, None) == "disk"
    monkeypatch.setattr(memory, "available_bytes", lambda: size * 4)
    assert choose_offload("auto", tiny_llama, None) == "none"
    assert choose_offload("disk", tiny_llama, None) == "disk"


def _header_bytes(path) -> int:
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as h:
            total += 8 + int.from_bytes(h.read(8), "little")
    return total


_FRAGMENT = """
import ctypes, sys
from owlctl.engine.memory import rss_mb, return_large_frees
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "1":
    assert return_large_frees()
big = libc.malloc(30 << 20); libc.memset(big, 1, 30 << 20); libc.free(big)  # raises the threshold to 30 MiB
base = rss_mb()
chunks = [libc.malloc(12 << 20) for _ in range(20)]  # a block's worth of 12 MiB tensors
for c in chunks:
    libc.memset(c, 1, 12 << 20)
above = libc.malloc(1 << 20)  # allocated after them (too big for older holes) and still alive
for c in chunks:
    libc.free(c)
print(rss_mb() - base)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensors_leave_the_process_when_streaming():
    """Both sides of the malloc setting the streamed host makes: with glibc's default (the threshold rose to
    30 MiB after a free of that size), 240 MiB of freed 12 MiB tensors below a live allocation stay
    resident (live 1 MiB above them); with a fixed 4 MiB threshold they go back to the kernel."""
    import subprocess
    import sys

    grew = [float(subprocess.run([sys.executable, "-c", _FRAGMENT, flag], capture_output=True, text=True,
                                 check=True).stdout) for flag in ("0", "1")]
    assert grew[1] < 20 and grew[0] > grew[1] + 100, grew
