"""Wall time, phase breakdown and memory of OWL pruning on the built-in model, owlctl vs the reference's
pipeline structure, measured side by side in one process on the same model and calibration data.

owlctl:     profile (1 batched block forward per block) + prune (2 batched block forwards per block),
            calibration tokens loaded once.
reference:  the structure of luuyin/OWL's main.py (SPEC 1.4, 12.9), emulated with owlctl's own kernels so
            that only the pipeline structure differs: batch-1 forwards, scoring with 2 block forwards per
            block (hooks, then outputs again), calibration loaded and tokenised twice (no cache), then
            pruning with 2 block forwards per block. The reference code itself cannot run here (it needs
            CUDA and transformers 4.28), so this is an emulation, and it says so in the results.

Writes docs/bench_prune.json and prints a markdown table.
  python benchmarks/bench_prune.py [--nsamples 32 --seqlen 512 --method wanda]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_prune.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from owlctl.core.methods import MethodOptions, wanda_scores
    from owlctl.core.outliers import block_outliers
    from owlctl.engine.allocation import allocation_from_profile
    from owlctl.engine.calibration.driver import run_blocks
    from owlctl.engine.calibration.profile import profile_model
    from owlctl.engine.calibration.prune import prune_model
    from owlctl.engine.data import calibration
    from owlctl.engine.data import tokens as data_mod
    from owlctl.engine.models import load_model
    from owlctl.engine.models.hosts import InMemory
    from owlctl.families import resolve

    base, tok, info = load_model("builtin:smollm2-135m")
    rss_model = rss_mb()
    model_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    layout0 = resolve(base)
    block_mb = sum(p.numel() * p.element_size() for p in layout0.blocks[0].parameters()) / 2**20
    act_mb = args.nsamples * args.seqlen * base.config.hidden_size * 4 / 2**20
    opts = MethodOptions()
    results: dict = {"model": info.id, "nsamples": args.nsamples, "seqlen": args.seqlen, "method": args.method,
                     "sparsity": args.sparsity, "threads": torch.get_num_threads(), "model_mb": round(model_mb, 1),
                     "block_mb": round(block_mb, 2), "activations_mb": round(act_mb, 1)}

    # ---------------------------------------------------------------- owlctl
    model = copy.deepcopy(base)
    layout = resolve(model)
    t0 = time.perf_counter()
    calib = calibration("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    t_cal = time.perf_counter() - t0
    doc, t_prof = profile_model(InMemory(model), tok, info, calib, outlier_m=(5.0,), device="cpu", batch_size=args.batch_size)
    alloc = allocation_from_profile(doc, None, None, target_sparsity=args.sparsity, outlier_m=5, lam=0.08)
    t1 = time.perf_counter()
    _, t_prune = prune_model(InMemory(model, layout), alloc, args.method, opts, calib, device="cpu", batch_size=args.batch_size)
    t_owl = time.perf_counter() - t0
    results["owlctl"] = {"wall_s": round(t_owl, 2), "calibration_load_s": round(t_cal, 2),
                         "profile": t_prof.as_dict(), "prune": t_prune.as_dict(),
                         "prune_wall_s": round(time.perf_counter() - t1, 2),
                         "block_forwards_per_sample_per_block": 1 + 2, "calibration_loads": 1,
                         "peak_rss_mb": round(rss_mb(), 1)}
    del model

    # ---------------------------------------------------------------- reference structure (emulated)
    model = copy.deepcopy(base)
    layout = resolve(model)
    t0 = time.perf_counter()

    def load_uncached():
        orig = data_mod._stream

        def fresh(text, tk, bos, what=""):  # bypass owlctl's token cache, as the reference re-tokenises
            return tk(text, return_tensors="pt").input_ids[0]

        data_mod._stream = fresh
        try:
            return calibration("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
        finally:
            data_mod._stream = orig

    t_a = time.perf_counter()
    calib1 = load_uncached()
    t_cal1 = time.perf_counter() - t_a
    ratios = []

    def score(i, _b, linears, stats):
        sc = [wanda_scores(linears[n].weight, stats[n].act_sq_norm()) for n in linears]
        ratios.append(block_outliers(sc, [5.0]))

    t_score = run_blocks(InMemory(model, layout), calib1.input_ids, device="cpu", batch_size=1,
                         needs=frozenset({"act_norm"}), decide=score, propagate="pruned")  # 2 forwards, batch 1
    t_a = time.perf_counter()
    calib2 = load_uncached()
    t_cal2 = time.perf_counter() - t_a
    assert torch.equal(calib1.input_ids, calib2.input_ids)
    t1 = time.perf_counter()
    _, t_prune_ref = prune_model(InMemory(model, layout), alloc, args.method, opts, calib2, device="cpu", batch_size=1)
    t_ref = time.perf_counter() - t0
    results["reference_structure"] = {
        "wall_s": round(t_ref, 2), "calibration_load_s": round(t_cal1 + t_cal2, 2), "scoring": t_score.as_dict(),
        "prune": t_prune_ref.as_dict(), "prune_wall_s": round(time.perf_counter() - t1, 2),
        "block_forwards_per_sample_per_block": 4, "calibration_loads": 2}
    results["owlctl_over_reference_wall"] = round(t_owl / t_ref, 3)
    results["rss_after_model_load_mb"] = round(rss_model, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
