"""Peak memory of pruning, in memory (--offload none) and streamed from disk (--offload disk), and a streamed
run under a hard memory limit smaller than the model (a cgroup v1 memory group; needs root).

Models:
  - a synthetic LLaMA with LLaMA-7B-shaped blocks (hidden 4096, intermediate 11008, 32 heads, 8 blocks,
    bfloat16, the SmolLM2 tokenizer's 49152-token vocabulary, untied embeddings; ~4 GB on disk), written
    tensor by tensor with random weights (memory does not depend on the values);
  - the built-in SmolLM2-135M (float32).
Each run is a fresh `python -m owlctl prune ... --json` process; its peak RSS is the kernel's VmHWM as the
prune document reports it. The budget the streamed run should stay under is computed from its parts:
the process after imports + the embedding matrix + 2 blocks + the calibration activations. The wall time of
streaming vs in memory on the built-in model is measured side by side (interleaved runs).

    python benchmarks/bench_memory.py [--runs wanda,sparsegpt,none,cgroup,builtin] [--limit-gb 2]
The synthetic runs use --batch-size 1 (one sequence per forward: the smallest working set) unless noted;
the default batch (8) is measured once beside them.
Writes docs/memory.json; benchmarks/write_results.py renders docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory/owlctl-bench-memory")
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             num_hidden_layers=8, max_position_embeddings=4096, vocab_size=49152, tie_word_embeddings=False,
             rms_norm_eps=1e-5)


def build_synthetic(path: Path) -> Path:
    """Write the synthetic model one tensor at a time (never more than one tensor in memory)."""
    import torch
    from transformers import LlamaConfig

    from owlctl.engine.models import builtin_model_dir
    from owlctl.engine.models.stream import parameters_on_meta
    from owlctl.formats.shards import Entry, ShardWriter, plan_of

    if (path / "config.json").is_file():
        return path
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".synthetic-"))
    config = LlamaConfig(**SHAPE, dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        skel = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plan = plan_of(skel, torch.bfloat16)
    writer = ShardWriter(tmp, [Entry(e.name, e.dtype, e.shape) for e in plan], {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    for e in plan:
        t = (torch.ones(e.shape) if "norm" in e.name else torch.randn(e.shape, generator=gen) * 0.02)
        writer.write(e.name, t.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(tmp)
    src = builtin_model_dir("builtin:smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            (tmp / f).write_bytes((src / f).read_bytes())
    os.replace(tmp, path)
    return path


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def baseline_rss_mb() -> float:
    """RSS of a process that imported what a prune imports (torch, transformers, owlctl's engine)."""
    code = ("import torch, transformers, safetensors; from transformers import LlamaForCausalLM; "
            "import owlctl.engine.calibration.driver, owlctl.core.methods.sparsegpt, owlctl.core.methods.wanda; "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def prune_run(model: str, method: str, offload: str, out: Path, nsamples: int, seqlen: int,
              cgroup: Path | None = None, batch_size: int | None = None, code: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "owlctl", "prune", model, "--method", method, "--uniform", "-s", "0.5",
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--offload", offload, "--device", "cpu",
           "--calib", "builtin:wiki", "-o", str(out), "--force", "--json", "-q"]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    env = dict(os.environ)
    if code is not None:  # an earlier checkout of owlctl (before streaming): no --offload, whole model loaded
        env["PYTHONPATH"] = str(code)
        i = cmd.index("--offload")
        del cmd[i:i + 2]
    if cgroup is not None:  # join the group before exec, so the whole process runs under its limit
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"model": model, "method": method, "offload": offload, "nsamples": nsamples, "seqlen": seqlen,
           "batch_size": batch_size or 8, "code": "before" if code is not None else "current",
           "returncode": proc.returncode, "wall_s": round(wall, 1),
           "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
           "load_average": round(load, 2), "cgroup_limit_mb": None}
    if cgroup is not None:
        row["cgroup_limit_mb"] = int((cgroup / "memory.limit_in_bytes").read_text()) // 2**20
        row["cgroup_max_usage_mb"] = int((cgroup / "memory.max_usage_in_bytes").read_text()) // 2**20
        row["cgroup_oom_kills"] = _oom_kills(cgroup)
    if proc.returncode == 0:
        doc = json.loads(proc.stdout)
        row.update(peak_rss_mb=doc["peak_rss_mb"], realised_sparsity=doc["realised_sparsity"],
                   seconds=doc["seconds"])
    else:
        row["stderr_tail"] = proc.stderr[-600:]
    return row


def _oom_kills(cgroup: Path) -> int | None:
    try:
        for line in (cgroup / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def make_cgroup(limit_bytes: int) -> Path | None:
    """A memory cgroup with the given hard limit (swap included where the kernel accounts it), or None."""
    if os.geteuid() != 0 or not CGROUP.parent.is_dir():
        return None
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.max_usage_in_bytes").write_text("0")
    (CGROUP / "memory.limit_in_bytes").write_text(str(limit_bytes))
    memsw = CGROUP / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        memsw.write_text(str(limit_bytes))
    return CGROUP


def check_loads(out: Path, sparsity: float = 0.5) -> dict:
    """The streamed checkpoint loads in plain transformers and is pruned as asked (checked per Linear)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    lin = m.model.layers[3].mlp.down_proj.weight
    got = float((lin == 0).float().mean())
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[1, 2, 3]])).logits
    del m
    return {"loads": True, "down_proj_3_sparsity": round(got, 4), "finite_logits": bool(torch.isfinite(logits).all()),
            "expected_sparsity": sparsity}


def budget_mb(base_mb: float, path: Path, nsamples: int, seqlen: int, batch: int = 1) -> dict:
    import json as _json

    cfg = _json.loads((path / "config.json").read_text())
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    el = 2 if cfg.get("dtype", cfg.get("torch_dtype")) in ("bfloat16", "float16") else 4
    emb = v * h * el
    block = (4 * h * h + 3 * h * inter) * el
    acts = 2 * nsamples * seqlen * h * el  # the block's inputs and its outputs
    heads = cfg["num_attention_heads"]
    # one forward of `batch` sequences: eager attention's fp32 scores and probabilities, the MLP's
    # gate/up/product intermediates (an estimate of the working set, not a bound)
    fwd = batch * (2 * heads * seqlen * seqlen * 4 + 3 * seqlen * inter * el)
    parts = {"baseline_after_imports_mb": base_mb, "embedding_mb": emb / 2**20, "two_blocks_mb": 2 * block / 2**20,
             "activations_mb": acts / 2**20, f"forward_batch_{batch}_mb": fwd / 2**20}
    parts = {k: round(x, 1) for k, x in parts.items()}
    parts["budget_mb"] = round(sum(parts.values()), 1)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="wanda,sparsegpt,wanda8,none,cgroup,builtin",
                    help="comma-separated: wanda, sparsegpt, wanda8 (default batch), none (in memory), cgroup, builtin")
    ap.add_argument("--merge", action="store_true", help="add these rows to an existing docs/memory.json")
    ap.add_argument("--limit-gb", type=float, default=2.0)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "owlctl-bench-memory"))
    ap.add_argument("--before", help="a checkout of owlctl before streaming (e.g. a git worktree): its rows too")
    args = ap.parse_args()
    runs = set(args.runs.split(","))
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    synth = build_synthetic(work / "llama7b-shaped-8-blocks")
    res: dict = {"synthetic": {"shape": SHAPE, "dtype": "bfloat16", "bytes_on_disk": model_bytes(synth)},
                 "baseline_rss_mb": round(baseline_rss_mb(), 1), "rows": []}
    res["budget"] = budget_mb(res["baseline_rss_mb"], synth, 8, 512, 1)
    res["budget_batch_8"] = budget_mb(res["baseline_rss_mb"], synth, 8, 512, 8)
    out = work / "out"
    for method in ("wanda", "sparsegpt"):
        if method in runs:
            res["rows"].append(prune_run(str(synth), method, "disk", out, 8, 512, batch_size=1))
            print(json.dumps(res["rows"][-1]), flush=True)
    if "wanda8" in runs:  # the default batch (8 sequences per forward): faster, a larger forward working set
        res["rows"].append(prune_run(str(synth), "wanda", "disk", out, 8, 512))
        print(json.dumps(res["rows"][-1]), flush=True)
    if "none" in runs:
        res["rows"].append(prune_run(str(synth), "wanda", "none", out, 8, 512, batch_size=1))
        print(json.dumps(res["rows"][-1]), flush=True)
    if "cgroup" in runs:
        group = make_cgroup(int(args.limit_gb * 2**30))
        if group is None:
            res["cgroup"] = "not run: needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory"
        else:
            for method in ("wanda", "sparsegpt"):
                row = prune_run(str(synth), method, "disk", out, 8, 512, cgroup=group, batch_size=1)
                if row["returncode"] == 0:
                    row["checkpoint"] = check_loads(out)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            row = prune_run(str(synth), "wanda", "none", out, 8, 512, cgroup=group, batch_size=1)  # in memory
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.before:
        old = Path(args.before)
        for model, n, t, b in ((str(synth), 8, 512, 1), ("builtin:smollm2-135m", 32, 512, None)):
            row = prune_run(model, "wanda", "none", out, n, t, batch_size=b, code=old)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if "builtin" in runs:
        for rep in range(2):  # interleaved, so load changes hit both paths alike
            for off in ("none", "disk"):
                row = prune_run("builtin:smollm2-135m", "wanda", off, out, 32, 512)
                row["repeat"] = rep
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
        res["builtin_bytes_on_disk"] = model_bytes(_builtin_dir())
    (ROOT / "docs").mkdir(exist_ok=True)
    path = ROOT / "docs" / "memory.json"
    if args.merge and path.is_file():  # rows measured in separate sittings (e.g. timing rows on a quiet machine)
        old = json.loads(path.read_text())
        res = {**old, **{k: v for k, v in res.items() if k != "rows"}, "rows": old["rows"] + res["rows"]}
    path.write_text(json.dumps(res, indent=2) + "\n")


def _builtin_dir() -> Path:
    from owlctl.engine.models import builtin_model_dir

    return builtin_model_dir("builtin:smollm2-135m")


if __name__ == "__main__":
    main()
