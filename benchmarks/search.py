"""`owlctl search` against uniform and OWL on the built-in model, evaluated on the TEST split (docs/results.md,
section "Search"; JSON in docs/search.json).

For every case (method:target, or method:N:M for mixed N:M) it runs the real CLI in a child process
(`owlctl search ... --budget B`; the search sees the calibration and validation splits only), records its
wall and CPU time and the load average, then prunes the built-in model with each allocation in this process
and measures perplexity with the reference protocol of docs/results.md (builtin:wiki test split, first 16
windows of 512 tokens, float32 cross-entropy, calibration 16 x 256 tokens, seed 0):

  uniform | OWL (M 5, lambda 0.08) | best grid (M, lambda): the OWL seed the search scored best on validation |
  search (the allocation file it wrote)

The machine is shared: run it under `flock /tmp/owlctl-bench.lock` so heavy benchmarks never overlap.

  flock /tmp/owlctl-bench.lock python benchmarks/search.py --cases wanda:0.7,sparsegpt:0.7 --budget 8m
  flock /tmp/owlctl-bench.lock python benchmarks/search.py --cases wanda:3:8 --budget 8m --resume
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _case(text: str) -> tuple[str, float | None, str | None]:
    method, rest = text.split(":", 1)
    if ":" in rest:
        return method, None, rest
    return method, float(rest), None


def _name(method: str, target: float | None, pattern: str | None) -> str:
    return f"{method}-{pattern.replace(':', 'of')}" if pattern else f"{method}-{round(target * 100)}"


def run_search(args, method: str, target: float | None, pattern: str | None, work: Path) -> dict:
    """The CLI in a child process; returns its allocation document plus what it cost."""
    out = work / f"search-{_name(method, target, pattern)}.json"
    cmd = [sys.executable, "-m", "owlctl", "search", args.model, "--method", method, "--calib", "builtin:wiki",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--budget", args.budget,
           "--device", "cpu", "--seed", "0", "-o", str(out), "--json"]
    cmd += ["--pattern", pattern] if pattern else ["-s", str(target)]
    if not args.resume:
        cmd.append("--force")
    if args.resume and out.is_file():
        return json.loads(out.read_text()) | {"_cost": json.loads(out.with_suffix(".cost.json").read_text())}
    load0 = os.getloadavg()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"search failed ({proc.returncode})")
    doc = json.loads(proc.stdout)
    cost = {"wall_s": round(wall, 1), "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1),
            "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "command": " ".join(cmd[2:])}
    out.with_suffix(".cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    return doc | {"_cost": cost}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--cases", default="wanda:0.7,sparsegpt:0.7")
    ap.add_argument("--budget", default="8m")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--resume", action="store_true", help="keep the cases already in OUT/search.json")
    ap.add_argument("--work", default="/tmp/owlctl-bench-search")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model == "builtin:smollm2-135m" else "-" + args.model.split(":")[-1]
    out_json = Path(args.out) / f"search{suffix}.json"
    doc = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else {"cases": []}
    doc.update({"model": args.model, "budget": args.budget,
                "protocol": {"calibration": f"builtin:wiki, {args.nsamples} x {args.seqlen} tokens, seed 0",
                             "eval": f"builtin:wiki test split, first {args.max_windows} windows of "
                                     f"{args.eval_seqlen} tokens, float32 cross-entropy",
                             "objective": "search default: KL on 8 x 256 tokens of the validation split"}})
    have = {c["case"] for c in doc["cases"]}
    cases = [c for c in args.cases.split(",") if c not in have]
    if not cases:
        return

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

    # each case: the search in a child process (this one idle meanwhile), then its test-split rows, so a run cut
    # short keeps the finished cases
    searched = {cases[0]: run_search(args, *_case(cases[0]), work)}
    base, tok, info = load_model(args.model)
    layout = resolve(base)
    bos = resolve_bos(tok, "auto")
    calib = calibration("builtin:wiki", tok, args.nsamples, args.seqlen, 0, bos=bos, bos_requested="auto")
    test = token_streams(["builtin:wiki"], "test", tok, bos)
    prof, _ = profile_model(InMemory(base), tok, info, calib, outlier_m=(3.0, 5.0, 6.0, 7.0, 9.0), device="cpu",
                            batch_size=8)
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    names = [b["name"] for b in prof["blocks"]]
    numels = [b["numel"] for b in prof["blocks"]]
    doc["threads"] = torch.get_num_threads()

    def ppl(alloc: dict, method: str) -> tuple[float, float]:
        m = copy.deepcopy(base)
        blocks, _ = prune_model(InMemory(m, resolve(m)), alloc, method, MethodOptions(), calib, device="cpu",
                                batch_size=8)
        r = evaluate_loaded(m, tok, data=["builtin:wiki"], seqlen=args.eval_seqlen, batch_size=8,
                            max_windows=args.max_windows, streams=test, bos=bos)
        return r["perplexity"]["builtin:wiki"]["ppl"], sum(b["zeros"] for b in blocks) / sum(b["numel"] for b in blocks)

    for c in cases:
        method, target, pattern = _case(c)
        s = searched.get(c) or run_search(args, method, target, pattern, work)
        info_s = s["params"]["search"]
        owl_seeds = [x for x in info_s["seeds"] if x["name"] != "uniform"]
        best = min(owl_seeds, key=lambda x: x["objective"])
        kw = {"pattern": pattern} if pattern else {"target_sparsity": target}
        owl_m, owl_lam = (6.0, 2.0) if pattern else (5.0, 0.08)
        allocs = {"uniform": uniform_allocation(model_dict, names, numels, **kw),
                  f"owl (M {owl_m:g}, lambda {owl_lam:g})": allocation_from_profile(
                      prof, None, None, outlier_m=owl_m, lam=owl_lam, **kw),
                  f"best grid (M {best['outlier_m']:g}, lambda {best['lambda']:g})": allocation_from_profile(
                      prof, None, None, outlier_m=best["outlier_m"], lam=best["lambda"], **kw),
                  "search": s}
        rows = []
        for label, alloc in allocs.items():
            t0 = time.perf_counter()
            value, real = ppl(alloc, method)
            rows.append({"allocation": label, "ppl": round(value, 2), "sparsity": round(real, 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(c, rows[-1], flush=True)
        doc["cases"].append({
            "case": c, "method": method, "target": target, "pattern": pattern, "rows": rows, "cost": s["_cost"],
            "search": {k: info_s[k] for k in ("mode", "budget", "seed", "evaluations", "generations", "improvements",
                                             "stopped", "uniform_objective", "best_seed", "best_seed_objective",
                                             "winner_objective", "verified", "chosen", "seconds", "levels")
                       if k in info_s},
            "seeds": [{"name": x["name"], "objective": x["objective"]} for x in info_s["seeds"]],
            "per_block": [b["n_keep"] if pattern else b["sparsity"] for b in s["blocks"]]})
        out_json.write_text(json.dumps(doc, indent=2) + "\n")  # after every case


if __name__ == "__main__":
    main()
