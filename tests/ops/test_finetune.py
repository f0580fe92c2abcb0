"""`owlctl.ops.finetune` and `owlctl.engine.recovery.lora` on tiny models: zeros survive every mode, masked-lora merges
exactly, merge-mask reports what the mask removed, adapter-only leaves the base alone, bad inputs fail early."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from owlctl.engine.recovery import lora
from owlctl.errors import InputError, OutputExistsError
from owlctl.ops.finetune import FinetuneConfig, FinetuneWarning, finetune

FAST = dict(steps=3, batch_size=2, effective_batch=4, block_size=32, eval_windows=2, lr=1e-2, warmup_steps=1,
            device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a loaded machine OpenMP spinning makes them ~7x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    return pruned_tiny(0.5)


def run(ckpt: Path, out: Path, text_file: Path, **kw) -> dict:
    return finetune(FinetuneConfig(checkpoint=ckpt, output=out, data=str(text_file), **{**FAST, **kw}))


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def prunable(model) -> dict[str, torch.Tensor]:
    from owlctl.families import resolve

    layout = resolve(model)
    return {f"{layout.block_name(i)}.{n}": lin.weight.detach().clone()
            for i in range(layout.num_blocks) for n, lin in layout.linears(i).items()}


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------ zeros survive
@pytest.mark.parametrize("mode", ["merge-mask", "masked-lora"])
def test_every_pruned_weight_stays_exactly_zero(pruned, text_file, tmp_path, mode):
    from owlctl.formats.checkpoint import read_checkpoint_records

    out = tmp_path / "out"
    res = run(pruned, out, text_file, keep_sparsity=mode)
    before, after = prunable(load(pruned)), prunable(load(out))
    assert before.keys() == after.keys()
    changed = []
    for name, w0 in before.items():
        w1 = after[name]
        assert torch.equal(w0 == 0, w1 == 0), name  # the same zeros, no more and no fewer
        if name.endswith(("q_proj", "v_proj")):
            changed.append(not torch.equal(w0, w1))
        else:
            assert torch.equal(w0, w1), f"{name} is not a target but changed"
    assert all(changed), "every target should have been updated by the merge"
    assert res["sparsity"]["zeros_after"] == res["sparsity"]["zeros_before"] > 0
    rec_in, rec_out = read_checkpoint_records(pruned), read_checkpoint_records(out)
    assert rec_out["allocation"] == rec_in["allocation"]  # carried over for `owlctl eval`
    assert rec_out["report"]["realised_sparsity"] == pytest.approx(rec_in["report"]["realised_sparsity"])
    assert rec_out["report"]["finetune"]["mode"] == mode
    assert rec_out["report"]["finetune"]["training"]["steps"] == 3
    assert rec_out["source"]["finetuned_from"] == str(pruned)
    from owlctl.ops.evaluate import audit_sparsity  # what `owlctl eval` runs: prune-time counts vs the weights

    assert audit_sparsity(load(out), rec_out)["status"] == "ok"


def test_merge_mask_reports_removed_delta(pruned, text_file, tmp_path):
    res = run(pruned, tmp_path / "out", text_file)
    d = res["delta_removed"]
    # A random-looking half of each matrix is masked, so roughly sqrt(1/2) of the update's norm goes.
    assert 0.3 < d["overall"] < 0.95
    assert set(d["by_target"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert len(d["modules"]) == 2 * 3 and all(m["removed_fraction"] > 0 for m in d["modules"])
    assert set(res["eval"]) == {"before", "after_unmasked", "after"}


def test_masked_lora_reports_nothing_removed(pruned, text_file, tmp_path):
    res = run(pruned, tmp_path / "out", text_file, keep_sparsity="masked-lora", targets="all-linear")
    assert res["delta_removed"]["overall"] == 0.0
    assert all(m["removed_fraction"] == 0.0 and m["delta_norm"] > 0 for m in res["delta_removed"]["modules"])
    assert len(res["delta_removed"]["modules"]) == 7 * 3


# ------------------------------------------------------------------------------ exact merges
def _train_a_little(net, ids: torch.Tensor, steps: int = 3) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(lora.trainable_parameters(net), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lora.linear_schedule(1, steps))
    loader = torch.utils.data.DataLoader(lora.windows(ids, 32), batch_size=2, shuffle=True, drop_last=True)
    net, opt, loader = acc.prepare(net, opt, loader)
    res = lora.train(acc, net, opt, sched, loader, steps=steps, grad_accum=1, max_grad_norm=1.0)
    assert len(res.losses) == steps and res.tokens == steps * 2 * 32


def _ids(tok, text_file: Path) -> torch.Tensor:
    return tok(text_file.read_text(), return_tensors="pt").input_ids[0]


def test_masked_lora_merge_equals_trained_function(pruned, text_file):
    from owlctl.engine.models import load_model
    from owlctl.families import resolve

    torch.manual_seed(0)
    model, tok, _ = load_model(str(pruned))
    layout = resolve(model)
    zeros = {k: w == 0 for k, w in prunable(model).items()}
    targets = lora.resolve_targets(layout, "all-linear")
    wrapped = lora.attach_masked_lora(model, layout, targets, r=4, alpha=8, dropout=0.05)
    ids = _ids(tok, text_file)
    _train_a_little(model, ids)
    assert all(w.lora_B.abs().sum() > 0 for w in wrapped.values())  # training moved the adapter
    probe = ids[:64].view(2, 32)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    merged, report = lora.merge_lora(model, layout, targets, "masked-lora")
    assert not any(isinstance(m, lora.MaskedLoraLinear) for m in merged.modules())
    with torch.no_grad():
        after = merged(input_ids=probe).logits
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-5)
    assert all(r["removed_fraction"] == 0.0 for r in report.modules)
    for k, w in prunable(merged).items():
        assert torch.equal(w == 0, zeros[k]), k


def test_merge_mask_equals_peft_merge_then_mask(pruned, text_file):
    from owlctl.engine.models import load_model
    from owlctl.families import resolve

    torch.manual_seed(0)
    model, tok, _ = load_model(str(pruned))
    layout = resolve(model)
    targets = lora.resolve_targets(layout, "q_proj,v_proj")
    net = lora.attach_peft_lora(model, targets, r=4, alpha=8, dropout=0.0)
    _train_a_little(net, _ids(tok, text_file))
    reference = copy.deepcopy(net).merge_and_unload()  # peft's own merge: dense on the targets
    ref_w = prunable(reference)
    merged, report = lora.merge_lora(net, layout, targets, "merge-mask")
    got = prunable(merged)
    masked_positions = 0
    for name, w in got.items():
        keep = w != 0
        torch.testing.assert_close(w[keep], ref_w[name][keep], atol=1e-6, rtol=1e-6)
        masked_positions += int((ref_w[name][~keep] != 0).sum())
    assert masked_positions > 0  # peft's merge would have filled zeros that ours kept
    assert {r["name"].split(".", 3)[-1] for r in report.modules} == set(targets)


# ------------------------------------------------------------------------------ adapter only
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_only_loads_with_peft_and_leaves_base_alone(pruned, text_file, tmp_path):
    from peft import PeftModel

    digest = tree_hash(pruned)
    out = tmp_path / "adapter"
    res = run(pruned, out, text_file, adapter_only=True)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert res["delta_removed"] is None and "note" in res["sparsity"]
    assert tree_hash(pruned) == digest  # the input checkpoint is untouched
    base_w = prunable(load(pruned))
    peft_model = PeftModel.from_pretrained(load(pruned), str(out))
    state = peft_model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # a trained adapter, not the zero init
    for name, w in base_w.items():  # the base layers inside the peft model are the checkpoint's weights
        key = next(k for k in state if k.endswith(name + ".weight") or k.endswith(name + ".base_layer.weight"))
        assert torch.equal(state[key], w)


# ------------------------------------------------------------------------------ training is real
def test_training_lowers_the_loss(pruned, text_file, tmp_path):
    res = run(pruned, tmp_path / "out", text_file, steps=12, targets="all-linear", lr=2e-2, dropout=0.0)
    losses = [v for _step, v in res["training"]["loss_curve"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert res["eval"]["after_unmasked"]["loss"] < res["eval"]["before"]["loss"]
    assert res["training"]["tokens"] == 12 * 4 * 32 and res["training"]["tokens_per_s"] > 0


def test_batch_arithmetic_and_its_warning(pruned, text_file, tmp_path):
    with pytest.warns(FinetuneWarning, match="using 4 sequences per update"):
        res = run(pruned, tmp_path / "out", text_file, effective_batch=5, steps=1)
    tr = res["training"]
    assert (tr["micro_batch"], tr["processes"], tr["grad_accum"], tr["effective_batch"]) == (2, 1, 2, 4)


def test_epochs_sets_the_number_of_updates(pruned, text_file, tmp_path):
    res = run(pruned, tmp_path / "out", text_file, steps=None, epochs=0.05, effective_batch=8, eval_windows=0)
    windows = res["data"]["train_windows"]
    assert res["training"]["steps"] == max(1, round(0.05 * (windows // 2 // 4)))
    assert res["eval"]["before"] is None


# ------------------------------------------------------------------------------ dense models
def test_dense_checkpoint_warns_nothing_to_keep(tiny_llama, text_file, tmp_path):
    with pytest.warns(FinetuneWarning, match="nothing to keep"):
        res = run(tiny_llama, tmp_path / "out", text_file, keep_sparsity="masked-lora", steps=1)
    assert res["sparsity"]["zeros_before"] == 0
    assert any("nothing to keep" in w for w in res["warnings"])


def test_merge_mask_on_plain_dense_model_is_refused(tiny_llama, text_file, tmp_path):
    with pytest.raises(InputError, match="no mask to re-apply"):
        run(tiny_llama, tmp_path / "out", text_file)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "--steps must be >= 1"),
    (dict(steps=2, epochs=1.0), "not both"),
    (dict(targets="gate_proj,nonexistent_proj"), "nonexistent_proj"),
    (dict(keep_sparsity="masked-lora", adapter_only=True), "adapter-only"),
    (dict(keep_sparsity="zeros"), "keep-sparsity"),
    (dict(rank=0), "--rank"),
    (dict(block_size=100_000), "block-size"),
])
def test_bad_inputs_fail_before_any_output(pruned, text_file, tmp_path, kw, match):
    with pytest.raises(InputError, match=match):
        run(pruned, tmp_path / "out", text_file, **kw)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_checkpoint_and_existing_output(pruned, text_file, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "out", text_file)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        run(pruned, tmp_path / "out", text_file)
    with pytest.raises(InputError, match="replace the input"):
        run(pruned, pruned, text_file, force=True)


# ------------------------------------------------------------------------------ small pieces
def test_resolve_targets(pruned):
    from owlctl.engine.models import load_model
    from owlctl.families import resolve

    layout = resolve(load_model(str(pruned))[0])
    assert lora.resolve_targets(layout, "q_proj,v_proj") == ("self_attn.q_proj", "self_attn.v_proj")
    assert lora.resolve_targets(layout, "self_attn.v_proj, q_proj") == ("self_attn.q_proj", "self_attn.v_proj")
    assert lora.resolve_targets(layout, "all-linear") == layout.linear_names
    with pytest.raises(InputError, match="choose among"):
        lora.resolve_targets(layout, "lm_head")


def test_linear_schedule():
    f = lora.linear_schedule(5, 15)
    assert [f(k) for k in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [f(k) for k in (5, 14)] == pytest.approx([1.0, 0.1])
    assert lora.linear_schedule(5, 2)(1) == pytest.approx(0.4)  # fewer updates than warmup: ramp only
    assert lora.linear_schedule(0, 4)(0) == 1.0
