"""Quality table on the built-in model and corpus (docs/results.md): dense; magnitude / wanda / sparsegpt x
uniform / OWL at 50, 60, 70%; 2:4; mixed N:M; an M x lambda sweep on the validation split with the best pair
then evaluated on the test split; the OWL figure.

Everything runs in one process: the model is loaded and the calibration set tokenised once, one dense
profile serves every OWL allocation, each pruned variant starts from a fresh copy of the dense weights.

  python benchmarks/quality.py                       # the table in docs/results.md (about an hour on 2 cores)
  python benchmarks/quality.py --quick               # smaller grid, for a look
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16, help="test windows per evaluation")
    ap.add_argument("--sweep-windows", type=int, default=8, help="validation windows per sweep point")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()

    import torch

    from owlctl.core.methods import MethodOptions
    from owlctl.engine.data import calibration
    from owlctl.engine.loading import load_model
    from owlctl.families import resolve
    from owlctl.ops.allocate import allocation_from_profile, uniform_allocation
    from owlctl.ops.evaluate import evaluate_loaded, token_streams
    from owlctl.ops.plot import plot_allocation
    from owlctl.ops.profile import profile_model
    from owlctl.ops.prune import prune_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base, tok, info = load_model("builtin:smollm2-135m")
    layout = resolve(base)
    calib = calibration("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    test = token_streams(["builtin:wiki"], "test", tok)
    val = token_streams(["builtin:wiki"], "validation", tok)
    prof, _ = profile_model(base, tok, info, calib, outlier_m=(3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0),
                            device="cpu", batch_size=8)
    (out / "results_profile.json").write_text(json.dumps(prof, indent=1) + "\n")
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    names = [b["name"] for b in prof["blocks"]]
    numels = [b["numel"] for b in prof["blocks"]]
    opts = MethodOptions()

    def ppl(model, streams, max_windows=args.max_windows) -> float:
        r = evaluate_loaded(model, tok, data=["builtin:wiki"], seqlen=args.eval_seqlen, batch_size=8,
                            max_windows=max_windows, streams=streams)
        return r["perplexity"]["builtin:wiki"]["ppl"]

    def pruned(alloc, method):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        blocks, _ = prune_model(m, resolve(m), alloc, method, opts, calib, device="cpu", batch_size=8)
        total = sum(b["numel"] for b in blocks)
        return m, sum(b["zeros"] for b in blocks) / total, time.perf_counter() - t0

    rows = []
    dense_test = ppl(base, test)
    rows.append({"method": "dense", "allocation": "-", "pattern": "-", "sparsity": 0.0, "ppl": dense_test})
    print(f"dense {dense_test:.3f}", flush=True)
    methods = ["magnitude", "wanda", "sparsegpt"]
    levels = [0.7] if args.quick else [0.5, 0.6, 0.7]

    # --- M x lambda sweep on the validation split (wanda, 70%)
    ms = [5.0] if args.quick else [3.0, 5.0, 7.0]
    lams = [0.08] if args.quick else [0.04, 0.08, 0.16]
    sweep = []
    for m_ in ms:
        for lam in lams:
            alloc = allocation_from_profile(prof, None, None, target_sparsity=0.7, outlier_m=m_, lam=lam)
            model, _, _ = pruned(alloc, "wanda")
            v = ppl(model, val, args.sweep_windows)
            sweep.append({"outlier_m": m_, "lambda": lam, "val_ppl": v})
            print(f"sweep M={m_:g} lambda={lam:g}: val {v:.3f}", flush=True)
            del model
    uni70 = uniform_allocation(model_dict, names, numels, target_sparsity=0.7)
    model, _, _ = pruned(uni70, "wanda")
    sweep_uniform_val = ppl(model, val, args.sweep_windows)
    del model
    best = min(sweep, key=lambda r: r["val_ppl"])

    # --- main table on the test split
    for method in methods:
        for s in levels:
            for kind in ("uniform", "owl"):
                alloc = (uniform_allocation(model_dict, names, numels, target_sparsity=s) if kind == "uniform"
                         else allocation_from_profile(prof, None, None, target_sparsity=s, outlier_m=5, lam=0.08))
                model, real, secs = pruned(alloc, method)
                p = ppl(model, test)
                rows.append({"method": method, "allocation": kind + (" (M 5, lambda 0.08)" if kind == "owl" else ""),
                             "pattern": "unstructured", "sparsity": real, "target": s, "ppl": p,
                             "prune_s": round(secs, 1)})
                print(rows[-1], flush=True)
                del model
    # best sweep pair vs the paper's, wanda 70%, test split
    alloc = allocation_from_profile(prof, None, None, target_sparsity=0.7, outlier_m=best["outlier_m"],
                                    lam=best["lambda"])
    model, real, secs = pruned(alloc, "wanda")
    best_test = ppl(model, test)
    del model
    rows.append({"method": "wanda", "allocation": f"owl (M {best['outlier_m']:g}, lambda {best['lambda']:g}; "
                 "best on validation)", "pattern": "unstructured", "sparsity": real, "target": 0.7, "ppl": best_test,
                 "prune_s": round(secs, 1)})
    # --- N:M: uniform 2:4 and 4:8 for every method; mixed 3:8 (reference "5:8") vs uniform 3:8 (wanda)
    for method in methods:
        for pat in ("2:4",):
            alloc = uniform_allocation(model_dict, names, numels, pattern=pat)
            model, real, secs = pruned(alloc, method)
            rows.append({"method": method, "allocation": "uniform", "pattern": pat, "sparsity": real,
                         "ppl": ppl(model, test), "prune_s": round(secs, 1)})
            print(rows[-1], flush=True)
            del model
    for kind in ("uniform", "owl"):
        alloc = (uniform_allocation(model_dict, names, numels, pattern="3:8") if kind == "uniform" else
                 allocation_from_profile(prof, None, None, pattern="3:8", outlier_m=6, lam=2))
        model, real, secs = pruned(alloc, "wanda")
        rows.append({"method": "wanda", "allocation": "mixed N:M (M 6, lambda 2)" if kind == "owl" else "uniform",
                     "pattern": "3:8" if kind == "uniform" else "3:8 mixed " +
                     "/".join(str(b["n_keep"]) for b in alloc["blocks"]),
                     "sparsity": real, "ppl": ppl(model, test), "prune_s": round(secs, 1)})
        print(rows[-1], flush=True)
        del model
    # --- the OWL figure (outlier ratio and per-block sparsity, paper style)
    fig_alloc = allocation_from_profile(prof, None, None, target_sparsity=0.7, outlier_m=5, lam=0.08)
    plot_allocation(fig_alloc, out / "owl_allocation.png", force=True)

    doc = {"model": model_dict, "calibration": calib.as_dict(), "eval": {"data": "builtin:wiki", "split": "test",
           "seqlen": args.eval_seqlen,
           "windows": min(args.max_windows, int(test["builtin:wiki"].numel() // args.eval_seqlen))},
           "rows": rows, "sweep": {"method": "wanda", "target": 0.7, "split": "validation",
                                   "windows": args.sweep_windows, "points": sweep, "uniform_val_ppl": sweep_uniform_val,
                                   "best": best, "best_test_ppl": best_test},
           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
