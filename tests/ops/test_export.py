"""`owlctl export`: ONNX graphs match PyTorch (with and without KV cache); packed checkpoints are bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from owlctl.engine.models import load_model
from owlctl.errors import FormatError, ModelError, OutputExistsError
from owlctl.formats import packed
from owlctl.formats.kinds import schema_name
from owlctl.ops.export import ExportConfig, export


@pytest.fixture(scope="module")
def pruned70(pruned_tiny):
    return pruned_tiny(0.7)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])


def test_onnx_without_kv_cache_matches_pytorch(pruned70, tmp_path):
    out = tmp_path / "onnx"
    doc = export(ExportConfig(checkpoint=str(pruned70), output=out, format="onnx", kv_cache=False))
    g = doc["onnx"]["graph"]
    assert doc["schema"] == schema_name("export") and g["opset"] == 17 and g["ir_version"] == 8
    assert g["inputs"] == ["input_ids", "attention_mask"] and g["outputs"] == ["logits"]
    assert doc["onnx"]["verification"]["max_abs_diff"] < 1e-4
    for f in ("model.onnx", "config.json", "tokenizer.json", "onnx-export.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "onnx-export.json").read_text())["onnx"]["graph"] == g
    # independent check on other shapes (dynamic batch and sequence axes)
    model, sess = _hf(pruned70), _ort(out)
    for b, s in ((1, 5), (3, 11)):
        ids = torch.randint(0, 260, (b, s))
        with torch.no_grad():
            ref = model(input_ids=ids).logits.numpy()
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), dtype=np.int64)})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4


def test_onnx_with_kv_cache_matches_pytorch_decode(pruned70, tmp_path):
    out = tmp_path / "onnx-kv"
    doc = export(ExportConfig(checkpoint=str(pruned70), output=out, format="onnx", kv_cache=True))
    g = doc["onnx"]["graph"]
    n_layers = g["geometry"]["num_layers"]
    assert n_layers == 3 and len(g["inputs"]) == 2 + 2 * n_layers and len(g["outputs"]) == 1 + 2 * n_layers
    assert g["inputs"][2] == "past_key_values.0.key" and g["outputs"][1] == "present.0.key"
    assert [c["case"] for c in doc["onnx"]["verification"]["cases"]] == ["prompt", "decode"]
    assert doc["onnx"]["verification"]["max_abs_diff"] < 1e-4
    # greedy decode in onnxruntime (prompt with an empty past, then 4 steps) vs PyTorch on the full sequence
    model, sess = _hf(pruned70), _ort(out)
    geo = g["geometry"]
    ids = torch.randint(0, 260, (2, 6))
    past = [np.zeros((2, geo["kv_heads"], 0, geo["head_dim"]), dtype=np.float32) for _ in range(2 * n_layers)]
    seq = ids.numpy()
    res = sess.run(None, dict(zip(g["inputs"], [seq, np.ones_like(seq), *past])))
    for _ in range(4):
        nxt = res[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        seq = np.concatenate([seq, nxt], axis=1)
        res = sess.run(None, dict(zip(g["inputs"], [nxt, np.ones_like(seq), *res[1:]])))
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(seq)).logits[:, -1].numpy()
        assert np.abs(res[0][:, -1] - ref).max() < 1e-4
        assert res[1].shape[2] == seq.shape[1]  # present grows by one position per step


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "phi3"])
def test_onnx_kv_export_other_families(tiny_models, family, tmp_path):
    doc = export(ExportConfig(checkpoint=str(tiny_models(family)), output=tmp_path / "o", kv_cache=True))
    assert doc["onnx"]["verification"]["max_abs_diff"] < 1e-4 and doc["onnx"]["graph"]["geometry"]["num_layers"] == 3


def test_export_refuses_existing_output(pruned70, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        export(ExportConfig(checkpoint=str(pruned70), output=out, format="packed"))


def test_unsupported_architecture_is_a_model_error(pruned70, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", boom)
    out = tmp_path / "onnx"
    with pytest.raises(ModelError) as e:
        export(ExportConfig(checkpoint=str(pruned70), output=out, format="onnx"))
    assert "ONNX export" in e.value.message and "failed" in e.value.message and "operator foo" in e.value.message
    assert e.value.hint and "--no-kv-cache" in e.value.hint
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))  # nothing half-written


def test_onnx_mismatch_above_tolerance_fails(pruned70, tmp_path, monkeypatch):
    from owlctl.deploy import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "verify_onnx", lambda *a, **k: {"max_abs_diff": 0.5, "cases": []})
    out = tmp_path / "onnx"
    with pytest.raises(ModelError, match="differ from PyTorch"):
        export(ExportConfig(checkpoint=str(pruned70), output=out, format="onnx", kv_cache=False))
    assert not out.exists()


def test_packed_round_trip_is_bit_exact_and_small(pruned70, tmp_path):
    out = tmp_path / "packed"
    doc = export(ExportConfig(checkpoint=str(pruned70), output=out, format="packed"))
    assert doc["schema"] == schema_name("export") and doc["format"] == "packed"
    assert packed.read_header(out)["schema"] == schema_name("packed")
    k = doc["packed"]
    assert k["packed_tensors"] == 3 * 7 and k["realised_sparsity"] == pytest.approx(0.7, abs=0.02)
    assert packed.is_packed(out) and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert k["packed_bytes"] < doc["dense_safetensors_bytes"] and k["size_ratio"] < 0.6
    # the packed weights alone: 0.3 x 4 bytes + 1 bit per weight, about a third of dense float32
    from safetensors.torch import load_file

    stored = load_file(str(out / packed.PACKED_WEIGHTS))
    head = packed.read_header(out)
    numel = sum(e["numel"] for e in head["tensors"] if e.get("encoding") == "bitmask")
    pbytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.endswith((".values", ".bitmask")))
    assert pbytes / (4 * numel) < 0.35
    original = _hf(pruned70).state_dict()
    loaded = packed.load_packed(out).state_dict()
    assert set(original) == set(loaded)
    for k, t in original.items():
        assert t.dtype == loaded[k].dtype and torch.equal(t, loaded[k]), k
    model, _tok, info = load_model(str(out))  # what eval / bench / export use for a packed MODEL
    assert torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"],
                       original["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_keeps_bit_patterns(dtype):
    w = torch.randn(7, 9).to(dtype)
    w[w.abs() < 0.8] = 0
    w[0, 0], w[1, 1], w[2, 2] = -0.0, float("nan"), float("inf")
    values, bits, nnz = packed.pack_tensor(w)
    assert bits.dtype == torch.uint8 and bits.numel() == (63 + 7) // 8
    assert nnz == int((packed._bits_view(w) != 0).sum())  # -0.0 is kept as a stored value
    back = packed.unpack_tensor(values, bits, [7, 9], dtype)
    assert torch.equal(packed._bits_view(back), packed._bits_view(w))


def test_packed_detects_corruption(pruned70, tmp_path):
    out = tmp_path / "packed"
    export(ExportConfig(checkpoint=str(pruned70), output=out, format="packed"))
    head = json.loads((out / packed.PACKED_JSON).read_text())
    head["tensors"][0]["sha256"] = "0" * 64
    (out / packed.PACKED_JSON).write_text(json.dumps(head))
    with pytest.raises(FormatError, match="sha256"):
        packed.load_packed(out)
    head["schema"] = "owlctl.packed/9"
    (out / packed.PACKED_JSON).write_text(json.dumps(head))
    with pytest.raises(FormatError, match="schema"):
        packed.load_packed(out)
