"""Render docs/results.md from the JSON the benchmarks wrote (docs/results.json, docs/bench_prune*.json,
docs/bench_startup.json). Numbers are copied, never typed: re-run the benchmarks, then this script."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str) -> dict | None:
    p = DOCS / name
    return json.loads(p.read_text()) if p.is_file() else None


def quality(doc: dict) -> list[str]:
    c, e = doc["calibration"], doc["eval"]
    out = [f"Calibration: `{c['source']}`, {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}. "
           f"Evaluation: `{e['data']}` {e['split']} split, the first {e['windows']} windows of {e['seqlen']} tokens "
           f"(reference protocol: non-overlapping windows, float32 cross-entropy). {doc['threads']} threads. "
           "The `prune s` column is wall time on a shared machine while other jobs ran (up to 5 processes on 2 "
           "cores): it is not comparable between rows; see the speed section for a side-by-side measurement.", "",
           "| method | allocation | pattern | target | realised sparsity | perplexity | prune s |",
           "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        t = "-" if r.get("target") is None else f"{r['target']:.3f}"
        out.append(f"| {r['method']} | {r['allocation']} | {r['pattern']} | {t} | {r['sparsity']:.4f} | "
                   f"{r['ppl']:.2f} | {r.get('prune_s', '-')} |")
    sw = doc.get("sweep")
    if sw and sw.get("points"):
        out += ["", f"M x lambda sweep: {sw['method']} at {sw['target']:.0%}, `builtin:wiki` {sw['split']} split, "
                f"{sw['windows']} windows. Uniform on the same windows: {sw.get('uniform_val_ppl', float('nan')):.2f}.",
                "", "| M | lambda | validation perplexity |", "|---|---|---|"]
        for p in sw["points"]:
            out.append(f"| {p['outlier_m']:g} | {p['lambda']:g} | {p['val_ppl']:.2f} |")
        if "best_test_ppl" in sw:
            b = sw["best"]
            out += ["", f"Best pair on validation: M {b['outlier_m']:g}, lambda {b['lambda']:g}; on the test split "
                    f"it gives {sw['best_test_ppl']:.2f} (the paper's M 5, lambda 0.08 row is in the table above)."]
    return out


def speed(doc: dict) -> list[str]:
    o, r = doc["owlctl"], doc["reference_structure"]
    return [f"`{doc['method']}` OWL at {doc['sparsity']:.0%}, {doc['nsamples']} x {doc['seqlen']} calibration "
            f"tokens, {doc['threads']} threads, model {doc['model_mb']} MiB (one block {doc['block_mb']} MiB, "
            f"calibration activations {doc['activations_mb']} MiB).", "",
            "| pipeline | wall s | calibration loads | block forwards per sample per block | forwards s | "
            "statistics s | masks/updates s | propagation s |", "|---|---|---|---|---|---|---|---|",
            f"| owlctl (profile + prune, batch 8) | {o['wall_s']} | {o['calibration_loads']} | "
            f"{o['block_forwards_per_sample_per_block']} | {o['profile']['forwards'] + o['prune']['forwards']:.1f} | "
            f"{o['profile']['statistics'] + o['prune']['statistics']:.1f} | "
            f"{o['profile']['decide'] + o['prune']['decide']:.1f} | {o['prune']['propagate']:.1f} |",
            f"| reference structure (emulated, batch 1) | {r['wall_s']} | {r['calibration_loads']} | "
            f"{r['block_forwards_per_sample_per_block']} | {r['scoring']['forwards'] + r['prune']['forwards']:.1f} | "
            f"{r['scoring']['statistics'] + r['prune']['statistics']:.1f} | "
            f"{r['scoring']['decide'] + r['prune']['decide']:.1f} | "
            f"{r['scoring']['propagate'] + r['prune']['propagate']:.1f} |", "",
            f"owlctl / reference wall time: **{doc['owlctl_over_reference_wall']:.2f}** (target < 0.5)."
            + (f" Note: {doc['note']}." if doc.get("note") else "")]


def main() -> None:
    parts = ["# Results", "", "Every number here was measured on this project's 2-core CPU machine by the scripts in "
             "`benchmarks/`, which wrote the JSON files beside this page; `python benchmarks/write_results.py` "
             "renders it. The built-in model is SmolLM2-135M (`builtin:smollm2-135m`), the corpus `builtin:wiki`.", ""]
    q = _load("results.json")
    if q:
        parts += ["## Quality (perplexity, lower is better)", "", *quality(q), "",
                  "![OWL allocation](owl_allocation.png)", "",
                  "The figure: outlier ratio D_l (M 5) per block and the OWL vs uniform sparsity per block at 70%.", ""]
    for name in ("bench_prune.json", "bench_prune_sparsegpt.json"):
        s = _load(name)
        if s:
            o = s["owlctl"]
            prof = sum(o["profile"][k] for k in ("capture", "statistics", "forwards", "decide"))
            parts += [f"## Pruning speed ({s['method']})", "", *speed(s), "",
                      f"Profiling alone ({s['nsamples']} x {s['seqlen']} tokens, one dense pass): {prof:.0f} s. "
                      f"Peak RSS of the benchmark process (two model copies alive): {o['peak_rss_mb']:.0f} MiB.", ""]
    old = _load("bench_prune_loaded.json")
    if old:
        parts += ["An earlier run of the same script, while up to five other jobs shared the two cores "
                  f"(`bench_prune_loaded.json`, before the faster mask selection landed): owlctl "
                  f"{old['owlctl']['wall_s']} s vs {old['reference_structure']['wall_s']} s, ratio "
                  f"{old['owlctl_over_reference_wall']:.2f}.", ""]
    st = _load("bench_startup.json")
    if st:
        parts += ["## Start-up", "", "| command | median wall s | minus bare python |", "|---|---|---|",
                  f"| `python -c pass` | {st['python_bare_s']} | - |",
                  f"| `owlctl --help` | {st['help_s']} | {st['help_minus_python_s']} |",
                  f"| `owlctl allocate profile.json -s 0.7 --json` (32 blocks) | {st['allocate_s']} | "
                  f"{st['allocate_minus_python_s']} |",
                  f"| `python -c 'import torch'` (for scale) | {st['import_torch_s']} | - |", ""]
    (DOCS / "results.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
