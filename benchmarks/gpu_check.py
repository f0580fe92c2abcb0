"""The GPU half of benchmarks/gpu_check.sh (read that first): each check is a fresh `python3 -m owlctl ...`
process, as a user runs it; the JSON documents it prints give peak CUDA memory, times and results."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             num_hidden_layers=12, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


SMALL = dict(SHAPE, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=2)  # --dry-run: the same checks on a CPU, to test this script before a GPU lease


def build(path: Path, shape: dict) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(".gpu/tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="600MB")
    tok.save_pretrained(path)
    return path


def owlctl(args: list[str], rows: list, name: str) -> dict | None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "owlctl", *args, "--json", "-q"], capture_output=True, text=True)
    row = {"check": name, "args": args, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    doc = None
    if proc.returncode == 0:
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            row["stdout_tail"] = proc.stdout[-800:]
    else:
        row["stderr_tail"] = proc.stderr[-1500:]
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "args"}), flush=True)
    return {"row": row, "doc": doc}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = {}, {}
    for f in sorted(a.glob("*.safetensors")):
        ta.update(load_file(f))
    for f in sorted(b.glob("*.safetensors")):
        tb.update(load_file(f))
    return ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/owlctl-gpu-work")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks this script, not a GPU)")
    args = ap.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    shape = SMALL if args.dry_run else SHAPE
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    res: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "shape": shape, "rows": [],
                 "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"}
    rows = res["rows"]
    model = build(work / "model", shape)
    data = ["--calib", ".gpu/calib.txt", "--nsamples", "32" if dev == "cuda" else "4", "--seqlen", "1024" if dev ==
            "cuda" else "64", "--device", dev]
    r = owlctl(["profile", str(model), *data, "--offload", "disk", "-o", str(work / "profile.json")], rows,
               "profile streamed")
    if r["doc"]:
        r["row"]["peak_cuda_mb"] = r["doc"].get("peak_cuda_mb")
    for method in ("wanda", "sparsegpt"):
        for off in ("disk", "none"):
            ck = work / f"{method}-{off}"
            r = owlctl(["prune", str(model), "--method", method, "--from-profile", str(work / "profile.json"),
                        "-s", "0.7", *data, "--offload", off, "-o", str(ck), "--force"], rows, f"prune {method} {off}")
            if r["doc"]:
                r["row"].update(peak_cuda_mb=r["doc"].get("peak_cuda_mb"), peak_rss_mb=r["doc"]["peak_rss_mb"],
                                realised_sparsity=r["doc"]["realised_sparsity"], seconds=r["doc"]["seconds"])
        a, b = work / f"{method}-disk", work / f"{method}-none"
        if a.is_dir() and b.is_dir():
            res[f"{method}_streamed_equals_in_memory"] = same_tensors(a, b)
    r = owlctl(["eval", str(work / "wanda-disk"), "--data", ".gpu/calib.txt", "--device", dev, "--max-windows", "8"],
               rows, f"eval perplexity {dev}")
    if r["doc"]:
        r["row"]["result"] = {k: r["doc"].get(k) for k in ("perplexity", "windows", "tokens") if k in r["doc"]}
    nm = work / "nm24"
    owlctl(["nm", str(model), "--pattern", "2:4", "--method", "magnitude", "--dtype", "float16", "-o", str(nm),
            "--device", dev, "--force"], rows, "nm 2:4")
    r = owlctl(["bench", str(nm), "--backend", "torch-sparse", "--device", dev,
                "--dtype", "float16" if dev == "cuda" else "float32"], rows,
               f"bench torch-sparse (2:4) {dev}")
    if r["doc"]:
        r["row"]["bench"] = r["doc"].get("rows")
    owlctl(["finetune", str(work / "wanda-disk"), "--data", ".gpu/calib.txt", "--steps", "5", "--device", dev,
            "-o", str(work / "ft"), "--force"], rows, f"finetune 5 steps {dev}")
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0 if all(row["returncode"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
