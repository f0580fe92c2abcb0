"""Quality tables on the built-in models and corpus (docs/results.md). The full grid (SmolLM2): dense;
magnitude / wanda / sparsegpt x uniform / OWL at 50, 60, 70%; 2:4; mixed N:M; an M x lambda sweep on the
validation split with the best pair then evaluated on the test split; the OWL figure. The 70% grid (Gemma-3):
dense; wanda / sparsegpt x uniform / OWL (M 5, lambda 0.08) at 70%; the OWL figure.

Everything runs in one process: the model is loaded and the calibration set tokenised once, one dense
profile serves every OWL allocation, each pruned variant starts from a fresh copy of the dense weights.
Calibration and evaluation windows follow --bos (auto: a BOS per window when the tokenizer adds one, i.e.
for Gemma-3 and not for SmolLM2); the setting used is recorded.

  python benchmarks/quality.py                       # the SmolLM2 table in docs/results.md (about an hour)
  python benchmarks/quality.py --model builtin:gemma3-270m --grid 70      # the Gemma-3 table (~15 min)
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
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--grid", default="full", choices=["full", "70"], help="70: dense, wanda/sparsegpt x uniform/OWL")
    ap.add_argument("--bos", default="auto", choices=["auto", "always", "never"])
    ap.add_argument("--resume", action="store_true", help="reuse the rows already in OUT/results.json")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()

    import torch

    from owlctl.core.methods import MethodOptions
    from owlctl.engine.allocation import allocation_from_profile, uniform_allocation
    from owlctl.engine.calibration.profile import profile_model
    from owlctl.engine.calibration.prune import prune_model
    from owlctl.engine.data import calibration, resolve_bos
    from owlctl.engine.evaluation.loaded import evaluate_loaded
    from owlctl.engine.evaluation.texts import token_streams
    from owlctl.engine.models import load_model
    from owlctl.engine.models.hosts import InMemory
    from owlctl.families import resolve
    from owlctl.ops.plot import plot_allocation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The SmolLM2 files keep their names (results.json, ...); other models get a suffix.
    suffix = "" if args.model == "builtin:smollm2-135m" else "-" + args.model.split(":")[-1].replace("/", "_")
    t_start = time.perf_counter()
    base, tok, info = load_model(args.model)
    layout = resolve(base)
    bos = resolve_bos(tok, args.bos)
    calib = calibration("builtin:wiki", tok, args.nsamples, args.seqlen, 0, bos=bos, bos_requested=args.bos)
    test = token_streams(["builtin:wiki"], "test", tok, bos)
    val = token_streams(["builtin:wiki"], "validation", tok, bos)
    prof, _ = profile_model(InMemory(base), tok, info, calib, outlier_m=(3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0),
                            device="cpu", batch_size=8)
    (out / f"results_profile{suffix}.json").write_text(json.dumps(prof, indent=1) + "\n")
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    names = [b["name"] for b in prof["blocks"]]
    numels = [b["numel"] for b in prof["blocks"]]
    opts = MethodOptions()

    def ppl(model, streams, max_windows=args.max_windows) -> float:
        r = evaluate_loaded(model, tok, data=["builtin:wiki"], seqlen=args.eval_seqlen, batch_size=8,
                            max_windows=max_windows, streams=streams, bos=bos)
        return r["perplexity"]["builtin:wiki"]["ppl"]

    def pruned(alloc, method):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        blocks, _ = prune_model(InMemory(m, resolve(m)), alloc, method, opts, calib, device="cpu", batch_size=8)
        total = sum(b["numel"] for b in blocks)
        frac = {k: sum(b[k] for b in blocks) / total for k in ("zeros", "pruned", "preexisting_zeros")}
        return m, frac, time.perf_counter() - t0

    rows = []
    cal_doc = calib.as_dict()
    cal_doc["fingerprint"] = {k: v for k, v in cal_doc["fingerprint"].items() if k != "paragraphs"}  # not needed here
    body = args.eval_seqlen - (1 if bos == "always" else 0)
    doc: dict = {"model": model_dict, "calibration": cal_doc,
                 "eval": {"data": "builtin:wiki", "split": "test", "seqlen": args.eval_seqlen, "bos": bos,
                          "windows": min(args.max_windows, int(test["builtin:wiki"].numel() // body))},
                 "rows": rows, "threads": torch.get_num_threads()}

    def save() -> None:  # after every row, so an interrupted run still leaves what it measured
        doc["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / f"results{suffix}.json").write_text(json.dumps(doc, indent=2) + "\n")

    done = {}
    if args.resume and (out / f"results{suffix}.json").is_file():
        old = json.loads((out / f"results{suffix}.json").read_text())
        done = {(r["method"], r["allocation"], r["pattern"], r.get("target")): r for r in old["rows"]}
        done.update({("sweep", p["outlier_m"], p["lambda"]): p for p in old.get("sweep", {}).get("points", [])})
        if "uniform_val_ppl" in old.get("sweep", {}):
            done[("sweep", "uniform")] = old["sweep"]["uniform_val_ppl"]

    def run(method: str, alloc: dict, label: str, pattern: str, target: float | None) -> None:
        if (method, label, pattern, target) in done:
            rows.append(done[(method, label, pattern, target)])
            save()
            return
        model, real, secs = pruned(alloc, method)
        rows.append({"method": method, "allocation": label, "pattern": pattern, "sparsity": real["zeros"],
                     "pruned_sparsity": real["pruned"], "preexisting_sparsity": real["preexisting_zeros"],
                     "target": target, "ppl": ppl(model, test), "prune_s": round(secs, 1)})
        print(rows[-1], flush=True)
        save()

    def owl(s: float, m_: float = 5.0, lam: float = 0.08) -> dict:
        return allocation_from_profile(prof, None, None, target_sparsity=s, outlier_m=m_, lam=lam)

    dense_row = done.get(("dense", "-", "-", None))
    dense_zeros = sum(int((lin.weight == 0).sum()) for i in range(layout.num_blocks)
                      for lin in layout.linears(i).values()) / sum(numels)
    rows.append(dense_row or {"method": "dense", "allocation": "-", "pattern": "-", "sparsity": dense_zeros,
                              "preexisting_sparsity": dense_zeros, "ppl": ppl(base, test)})
    print(rows[-1], flush=True)
    save()
    if bos == "always":  # the same dense model with the reference's stream protocol, for comparison
        key = ("dense (--bos never)", "-", "-", None)
        if key not in done:
            never = token_streams(["builtin:wiki"], "test", tok, "never")
            r = evaluate_loaded(base, tok, data=["builtin:wiki"], seqlen=args.eval_seqlen, batch_size=8,
                                max_windows=args.max_windows, streams=never, bos="never")
            done[key] = {"method": key[0], "allocation": "-", "pattern": "-", "sparsity": dense_zeros,
                         "preexisting_sparsity": dense_zeros, "ppl": r["perplexity"]["builtin:wiki"]["ppl"]}
        rows.append(done[key])
        print(rows[-1], flush=True)
        save()
    methods = ["wanda", "sparsegpt", "magnitude"] if args.grid == "full" else ["wanda", "sparsegpt"]
    # most important first: 70% for every method, then N:M, then the sweep, then 60% and 50%
    for method in methods:
        run(method, uniform_allocation(model_dict, names, numels, target_sparsity=0.7), "uniform", "unstructured", 0.7)
        run(method, owl(0.7), "owl (M 5, lambda 0.08)", "unstructured", 0.7)
    if args.grid == "70":
        plot_allocation(owl(0.7), out / f"owl_allocation{suffix}.png", force=True)
        save()
        print(json.dumps(doc, indent=2))
        return
    for method in methods:
        run(method, uniform_allocation(model_dict, names, numels, pattern="2:4"), "uniform", "2:4", 0.5)
    run("wanda", uniform_allocation(model_dict, names, numels, pattern="3:8"), "uniform", "3:8", 0.625)
    mixed = allocation_from_profile(prof, None, None, pattern="3:8", outlier_m=6, lam=2)
    run("wanda", mixed, "mixed N:M (M 6, lambda 2)",
        "3:8 mixed, n_keep per block " + "/".join(str(b["n_keep"]) for b in mixed["blocks"]), 0.625)

    for s in ([] if args.quick else [0.6, 0.5]):  # wanda at the other levels before the sweep
        run("wanda", uniform_allocation(model_dict, names, numels, target_sparsity=s), "uniform", "unstructured", s)
        run("wanda", owl(s), "owl (M 5, lambda 0.08)", "unstructured", s)
    # --- M x lambda sweep on the validation split (wanda, 70%), best pair then on the test split
    ms = [5.0] if args.quick else [3.0, 5.0, 7.0]
    lams = [0.08] if args.quick else [0.04, 0.08, 0.16]
    sweep: list[dict] = []
    doc["sweep"] = {"method": "wanda", "target": 0.7, "split": "validation", "windows": args.sweep_windows,
                    "points": sweep}
    if ("sweep", "uniform") in done:
        doc["sweep"]["uniform_val_ppl"] = done[("sweep", "uniform")]
    else:
        model, _, _ = pruned(uniform_allocation(model_dict, names, numels, target_sparsity=0.7), "wanda")
        doc["sweep"]["uniform_val_ppl"] = ppl(model, val, args.sweep_windows)
        del model
    for m_ in ms:
        for lam in lams:
            if ("sweep", m_, lam) in done:
                sweep.append(done[("sweep", m_, lam)])
                continue
            model, _, _ = pruned(owl(0.7, m_, lam), "wanda")
            sweep.append({"outlier_m": m_, "lambda": lam, "val_ppl": ppl(model, val, args.sweep_windows)})
            print(f"sweep {sweep[-1]}", flush=True)
            del model
            save()
    best = min(sweep, key=lambda r: r["val_ppl"])
    doc["sweep"]["best"] = best
    run("wanda", owl(0.7, best["outlier_m"], best["lambda"]),
        f"owl (M {best['outlier_m']:g}, lambda {best['lambda']:g}; best on validation)", "unstructured", 0.7)
    doc["sweep"]["best_test_ppl"] = rows[-1]["ppl"]
    save()
    for s in ([] if args.quick else [0.6, 0.5]):
        for method in methods[1:]:
            run(method, uniform_allocation(model_dict, names, numels, target_sparsity=s), "uniform", "unstructured", s)
            run(method, owl(s), "owl (M 5, lambda 0.08)", "unstructured", s)
    # --- the OWL figure (outlier ratio and per-block sparsity, paper style)
    fig_alloc = allocation_from_profile(prof, None, None, target_sparsity=0.7, outlier_m=5, lam=0.08)
    plot_allocation(fig_alloc, out / "owl_allocation.png", force=True)

    save()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
