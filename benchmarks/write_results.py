"""Render docs/results.md from the JSON the benchmarks wrote (docs/results.json, docs/results-gemma3-270m.json,
docs/propagation-*.json, docs/bench_prune*.json, docs/bench_startup.json, docs/search*.json), and docs/memory.md
from docs/memory.json (benchmarks/bench_memory.py). Numbers are copied, never typed: re-run the benchmarks, then
this script."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str) -> dict | None:
    p = DOCS / name
    return json.loads(p.read_text()) if p.is_file() else None


def _bos(doc: dict) -> str:
    # Runs before --bos existed recorded nothing: they are the reference protocol (one stream, --bos never).
    c, e = doc["calibration"], doc["eval"]
    cb, eb = c.get("bos", "never"), e.get("bos", "never")
    if cb == eb == "always":
        return (f"BOS: `--bos always` (auto for this tokenizer): every window starts with BOS, followed by "
                f"{c['seqlen'] - 1} (calibration) or {e['seqlen'] - 1} (evaluation) text tokens")
    if cb == eb == "never":
        return "BOS: `--bos never` (auto for this tokenizer, which adds none; the reference protocol)"
    return f"BOS: calibration `{cb}`, evaluation `{eb}`"


def quality(doc: dict, shared_note: bool = True) -> list[str]:
    c, e = doc["calibration"], doc["eval"]
    out = [f"Calibration: `{c['source']}`, {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}. "
           f"Evaluation: `{e['data']}` {e['split']} split, the first {e['windows']} windows of {e['seqlen']} tokens "
           f"(non-overlapping windows, remainder dropped, float32 cross-entropy). {_bos(doc)}. "
           f"{doc['threads']} threads. "
           + ("The `prune s` column is wall time on a shared machine while other jobs ran (up to 5 processes on 2 "
              "cores): it is not comparable between rows; see the speed section for a side-by-side measurement."
              if shared_note else "The `prune s` column is wall time on a machine shared with other jobs."), ""]
    pre = any("preexisting_sparsity" in r for r in doc["rows"])
    if pre:
        out += ["| method | allocation | pattern | target | zero before pruning | pruned (masks) | "
                "realised sparsity (all zeros) | perplexity | prune s |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        out += ["| method | allocation | pattern | target | realised sparsity | perplexity | prune s |",
                "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        t = "-" if r.get("target") is None else f"{r['target']:.3f}"
        if pre:
            p = "-" if r.get("pruned_sparsity") is None else f"{r['pruned_sparsity']:.4f}"
            out.append(f"| {r['method']} | {r['allocation']} | {r['pattern']} | {t} | "
                       f"{r.get('preexisting_sparsity', 0.0):.4f} | {p} | {r['sparsity']:.4f} | {r['ppl']:.2f} | "
                       f"{r.get('prune_s', '-')} |")
        else:
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


def owl_vs_uniform(doc: dict) -> list[str]:
    """One sentence per method: OWL against uniform at the same target, as measured (better or worse)."""
    rows = {(r["method"], r["allocation"].split(" ")[0], r.get("target")): r["ppl"] for r in doc["rows"]}
    out = []
    for (method, alloc, target), ppl in rows.items():
        if alloc != "owl" or (method, "uniform", target) not in rows:
            continue
        uni = rows[(method, "uniform", target)]
        verdict = "better than" if ppl < uni else "worse than"
        out.append(f"- {method} at {target:.0%}: OWL {ppl:.2f} vs uniform {uni:.2f} ({(ppl - uni) / uni:+.1%}), "
                   f"OWL {verdict} uniform on this model.")
    return out


def propagation(docs: list[dict]) -> list[str]:
    """Per-block relative error of the driver's propagated hidden states vs the model's own forward."""
    out = ["Relative error ||h - h_model|| / ||h_model|| of each block's output (dense, float32, windows of the "
           "`builtin:wiki` test split) when the driver replays block 0's inputs for every block (the reference's "
           "Catcher, owlctl before this fix) and with owlctl's per-block inputs. Written by "
           "`benchmarks/propagation.py`.", ""]
    head = "| block | layer type | " + " | ".join(
        f"replay, {d['windows']} x {d['seqlen']}, bos {d['bos']} | owlctl" for d in docs) + " |"
    out += [head, "|---|---|" + "---|---|" * len(docs)]
    for i, r in enumerate(docs[0]["rows"]):
        cells = " | ".join(f"{d['rows'][i]['replay_block0']:.4f} | {d['rows'][i]['owlctl']:.1e}" for d in docs)
        out.append(f"| {r['block']} | {r['layer_type'] or '-'} | {cells} |")
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


def _mem_row(r: dict, model_mb: float) -> str:
    code = "before streaming" if r.get("code") == "before" else "current"
    limit = f"{r['cgroup_limit_mb']} MiB" if r.get("cgroup_limit_mb") else "-"
    if r["returncode"] != 0:
        kills = r.get("cgroup_oom_kills")
        why = f"exit {r['returncode']}" + (f", OOM kills {kills}" if kills else "")
        return (f"| {r['method']} | {r['offload']} | {r['batch_size']} | {code} | {limit} | failed ({why}) | - | "
                f"{r['wall_s']} | {r['cpu_s']} | {r['load_average']} |")
    peak = r["peak_rss_mb"]
    return (f"| {r['method']} | {r['offload']} | {r['batch_size']} | {code} | {limit} | {peak:.0f} | "
            f"{peak / model_mb:.2f} | {r['wall_s']} | {r['cpu_s']} | {r['load_average']} |")


def memory(doc: dict) -> list[str]:
    synth_mb = doc["synthetic"]["bytes_on_disk"] / 2**20
    head = ["| method | --offload | batch | code | memory limit | peak RSS MiB | / model | wall s | CPU s | load |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    syn = [r for r in doc["rows"] if r["model"] != "builtin:smollm2-135m"]
    bi = [r for r in doc["rows"] if r["model"] == "builtin:smollm2-135m"]
    b = doc["budget"]
    sh = doc["synthetic"]["shape"]
    out = [f"Synthetic LLaMA with LLaMA-7B-shaped blocks (hidden {sh['hidden_size']}, intermediate "
           f"{sh['intermediate_size']}, {sh['num_attention_heads']} heads, {sh['num_hidden_layers']} blocks, vocab "
           f"{sh['vocab_size']}, untied embeddings), bfloat16, {synth_mb:,.0f} MiB of safetensors; "
           "`prune --uniform -s 0.5`, 8 x 512 calibration tokens from builtin:wiki, `--device cpu`. Peak RSS is "
           "the kernel's VmHWM as the prune document reports it.", "",
           "Budget for a streamed run (computed by the script from the model's config, batch 1): " +
           ", ".join(f"{k.removesuffix('_mb').replace('_', ' ')} {v:,.0f}" for k, v in b.items() if k != "budget_mb")
           + f" = **{b['budget_mb']:,.0f} MiB** ({b['budget_mb'] / synth_mb:.2f}x the model). With the default "
           f"batch of 8 the estimate is {doc['budget_batch_8']['budget_mb']:,.0f} MiB.", "", *head,
           *(_mem_row(r, synth_mb) for r in syn)]
    for r in syn:
        if r.get("checkpoint"):
            c = r["checkpoint"]
            out.append("")
            out.append(f"The checkpoint written by {r['method']} under the {r['cgroup_limit_mb']} MiB limit loads in "
                       f"plain transformers (`from_pretrained`): loads {c['loads']}, block 3 down_proj sparsity "
                       f"{c['down_proj_3_sparsity']} (asked {c['expected_sparsity']}), finite logits "
                       f"{c['finite_logits']}.")
    if bi:
        bmb = doc["builtin_bytes_on_disk"] / 2**20
        out += ["", f"The built-in model (SmolLM2-135M, float32, {bmb:,.0f} MiB), wanda 32 x 512, runs interleaved:",
                "", *head, *(_mem_row(r, bmb) for r in bi)]
        cur = [r for r in bi if r.get("code") != "before" and r["returncode"] == 0]
        walls = {off: [r["wall_s"] for r in cur if r["offload"] == off] for off in ("none", "disk")}
        if walls["none"] and walls["disk"]:
            ratio = (sum(walls["disk"]) / len(walls["disk"])) / (sum(walls["none"]) / len(walls["none"]))
            out += ["", f"Streamed / in-memory wall time on the built-in model (mean of the interleaved runs): "
                    f"**{ratio:.2f}x**."]
    if doc.get("note"):
        out += ["", f"Note: {doc['note']}."]
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def search_section(doc: dict) -> list[str]:
    """The `owlctl search` benchmark (benchmarks/search.py): test-split perplexity per allocation, the targets,
    the objective of every seed and of the winner, and what each search cost."""
    p = doc["protocol"]
    out = [f"`benchmarks/search.py` on `{doc['model']}`: each search is the CLI (`owlctl search ... --budget "
           f"{doc['budget']}`, defaults otherwise: levels S +- 0.15 in steps of 0.025 built on the uniform path, "
           f"seeds uniform + OWL M in {{3, 5, 7, 9}} x lambda in {{0.04, 0.08, 0.12, 0.16}}, 8 children per "
           f"generation, real-prune check of the winner); it never reads the test split. Objective: "
           f"{p['objective']}. Calibration: {p['calibration']}. Evaluation: {p['eval']} (the protocol of the "
           f"tables above). The best grid pair is the OWL seed the search scored best on validation; the machine "
           f"was shared with other jobs (load averages below). A time budget counts the whole command and stops "
           f"new generations; the generation under way and the real-prune check of the winner run after it, "
           f"hence wall times above the budget. CPU time is the search process's user + system time.", ""]
    for c in doc["cases"]:
        rows = {r["allocation"]: r for r in c["rows"]}
        uni = rows["uniform"]["ppl"]
        owl = next(r for k, r in rows.items() if k.startswith("owl"))
        grid = next(r for k, r in rows.items() if k.startswith("best grid"))
        srch = rows["search"]
        what = f"{c['method']} {c['pattern']} mixed" if c["pattern"] else f"{c['method']} {c['target']:.0%}"
        out += [f"### {what}", "", "| allocation | test perplexity | vs uniform | realised sparsity |",
                "|---|---|---|---|"]
        for r in c["rows"]:
            out.append(f"| {r['allocation']} | {r['ppl']:.2f} | {r['ppl'] / uni:.3f} | {r['sparsity']:.4f} |")
        checks = [f"search <= uniform: {srch['ppl']:.2f} vs {uni:.2f}, {_verdict(srch['ppl'] <= uni)}"]
        if not c["pattern"]:
            checks = [f"search <= 0.85x OWL: {srch['ppl'] / owl['ppl']:.3f}x, {_verdict(srch['ppl'] <= 0.85 * owl['ppl'])}",
                      f"search <= 0.9x best grid: {srch['ppl'] / grid['ppl']:.3f}x, "
                      f"{_verdict(srch['ppl'] <= 0.9 * grid['ppl'])}"] + checks
        si, cost = c["search"], c["cost"]
        seeds = {x["name"]: x["objective"] for x in c["seeds"]}
        owl_seed = next((v for k, v in seeds.items() if k in ("owl M 5 lambda 0.08", "owl M 6 lambda 2")), None)
        ver = si.get("verified") or {}
        out += ["", "Targets: " + "; ".join(checks) + ".", "",
                f"Objective (KL, validation): uniform {si['uniform_objective']:.5f}"
                + (f", OWL seed (M 5, lambda 0.08) {owl_seed:.5f}" if owl_seed is not None and not c["pattern"] else "")
                + f", best seed ({si['best_seed']}) {si['best_seed_objective']:.5f}, winner {si['winner_objective']:.5f}"
                + (f", winner pruned for real {ver['objective']:.5f}" if ver else "")
                + f"; chosen: {si['chosen']}. {si['evaluations']} children in {si['generations']} generations "
                f"({si['improvements']} improvements, stopped: {si.get('stopped', 'budget')}).", "",
                f"Cost: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} s CPU (search process); phases "
                + ", ".join(f"{k} {v:.0f} s" for k, v in si["seconds"].items())
                + f"; load average {cost['loadavg_before'][0]:.2f} before, {cost['loadavg_after'][0]:.2f} after.", "",
                "All seeds: " + ", ".join(f"{k} {v:.5f}" for k, v in seeds.items()) + ".", "",
                "Per block (search): " + " ".join(f"{v:g}" if isinstance(v, int) else f"{v:.3f}"
                                                  for v in c["per_block"]) + ".", ""]
    if doc.get("not_run"):
        out += ["Not measured:", "", *[f"- {x}" for x in doc["not_run"]], ""]
    return out


def main() -> None:
    parts = ["# Results", "", "Every number here was measured on this project's 2-core CPU machine by the scripts in "
             "`benchmarks/`, which wrote the JSON files beside this page; `python benchmarks/write_results.py` "
             "renders it. The built-in models are SmolLM2-135M (`builtin:smollm2-135m`, the default) and Gemma-3-270M "
             "(`builtin:gemma3-270m`), the corpus `builtin:wiki`.", ""]
    q = _load("results.json")
    if q:
        parts += ["## Quality (perplexity, lower is better)", "", *quality(q), "",
                  "![OWL allocation](owl_allocation.png)", "",
                  "The figure: outlier ratio D_l (M 5) per block and the OWL vs uniform sparsity per block at 70%.", ""]
    g = _load("results-gemma3-270m.json")
    if g:
        parts += ["## Quality on Gemma-3-270M (`builtin:gemma3-270m`)", "",
                  "The second built-in model: Gemma-3-270M, the base model (18 blocks, hidden 640, vocab 262k; "
                  "sliding-window attention (512) in 15 blocks, full attention in blocks 5, 11 and 17; Gemma "
                  "Terms of Use apply), dequantised from a Q4_K_M GGUF, whose prunable weights are already "
                  f"{g['rows'][0].get('preexisting_sparsity', 0.0):.2%} exact zeros. Same protocol as the SmolLM2 "
                  "table above, except that `--bos auto` gives this tokenizer a BOS per window (the row `--bos "
                  "never` is the dense model under the reference's single-stream protocol).", "",
                  *quality(g, shared_note=False), "", *owl_vs_uniform(g), "",
                  "![OWL allocation, Gemma-3](owl_allocation-gemma3-270m.png)", ""]
    for name, title in (("search.json", "Search (`owlctl search`) on SmolLM2-135M"),
                        ("search-gemma3-270m.json", "Search (`owlctl search`) on Gemma-3-270M")):
        sd = _load(name)
        if sd and sd.get("cases"):
            parts += [f"## {title}", "", *search_section(sd)]
    props = [d for d in (_load(f"propagation-gemma3-270m-{n}.json") for n in ("512-never", "512-always", "1024-always"))
             if d]
    if props:
        parts += ["## Block-by-block propagation on Gemma-3-270M", "", *propagation(props), ""]
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
        cur, base = st.get("current", st), st.get("baseline")
        head = "| command | median wall s | median CPU s | minus bare python |"
        rows = [("`python -c pass`", "python_bare", False), ("`owlctl --help`", "help", True),
                ("`owlctl allocate profile.json --target-sparsity 0.7 --json` (32 blocks)", "allocate", True)]
        if base:
            head += " previous layout, minus bare python | ratio |"
        parts += ["## Start-up", "", f"{st['runs']} runs of each, interleaved; load average "
                  f"{st.get('load_average_before', '?')} before, {st.get('load_average_after', '?')} after.", "",
                  head, "|---|---|---|---|" + ("---|---|" if base else "")]
        for label, key, minus in rows:
            line = (f"| {label} | {cur[key + '_s']} | {cur.get(key + '_cpu_s', '-')} | "
                    f"{cur[key + '_minus_python_s'] if minus else '-'} |")
            if base:
                line += (f" {base[key + '_minus_python_s']} | {st['ratio_current_over_baseline'][key]} |" if minus
                         else " - | - |")
            parts.append(line)
        parts += ["", f"For scale, `python -c 'import torch'`: {st['import_torch_s']} s.", ""]
    (DOCS / "results.md").write_text("\n".join(parts) + "\n")
    m = _load("memory.json")
    if m:
        (DOCS / "memory.md").write_text("\n".join(["# Memory", "", "Measured by `benchmarks/bench_memory.py` on this "
                                                   "project's 2-core CPU machine; rendered by "
                                                   "`benchmarks/write_results.py` from docs/memory.json.", "",
                                                   *memory(m)]) + "\n")


if __name__ == "__main__":
    main()
