#!/usr/bin/env bash
# The 1-GPU NCCL check of several-process pruning, called by benchmarks/gpu_check.sh (after gpu_check.py) as
#     bash benchmarks/gpu_distributed.sh
# from the repository root, with $OUT the results folder (default /tmp/gpu-check-out) and PYTHONPATH as
# gpu_check.sh sets it. For wanda and sparsegpt it runs
#     torchrun --standalone --nproc-per-node 1 -m owlctl prune MODEL ... --device cuda
# (one process, NCCL backend, device cuda:0: the process-group path with every collective on the GPU), then
# the same prune without the launcher, and writes $OUT/gpu_distributed.json: per run the exit status, wall
# seconds, owlctl's seconds (collectives included) and whether the two checkpoints hold equal masks.
# MODEL: builtin:smollm2-135m when its weights are installed there, else the synthetic model gpu_check.py
# built (/tmp/owlctl-gpu-work/model); $OWLCTL_DIST_MODEL and $OWLCTL_DIST_CALIB override model and text.
# Never stops the caller: it always exits 0.
OUT=${OUT:-/tmp/gpu-check-out}
PY=${PYTHON:-python3}
WORK=${OWLCTL_DIST_WORK:-/tmp/owlctl-gpu-dist}
DEVICE=${OWLCTL_DIST_DEVICE:-cuda}  # cpu: a dry run of this script (gloo) on a machine without a GPU
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OWLCTL_DIST_TIMEOUT=${OWLCTL_DIST_TIMEOUT:-600}

MODEL=${OWLCTL_DIST_MODEL:-}
if [ -z "$MODEL" ]; then
    if "$PY" -c "from owlctl.engine.models import builtin_model_dir; builtin_model_dir('builtin:smollm2-135m')" \
        > "$WORK/builtin_probe.txt" 2>&1; then
        MODEL=builtin:smollm2-135m
    elif [ -d /tmp/owlctl-gpu-work/model ]; then
        MODEL=/tmp/owlctl-gpu-work/model
    fi
fi
DATA=(--nsamples 32 --seqlen 256)
if [ -n "${OWLCTL_DIST_CALIB:-}" ]; then
    DATA+=(--calib "$OWLCTL_DIST_CALIB")
elif [ "$MODEL" != "builtin:smollm2-135m" ] && [ -f .gpu/calib.txt ]; then
    DATA+=(--calib .gpu/calib.txt)  # the carried text: the GPU machine cannot download a corpus
fi

rows=()
run() {  # name, then the command; one JSON row per run
    local name=$1; shift
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout 600 "$@" > "$WORK/$name.json" 2> "$WORK/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    tail -n 40 "$WORK/$name.err" > "$OUT/gpu_distributed_$name.stderr.txt"
    rows+=("$("$PY" - "$name" "$rc" "$t0" "$t1" "$WORK/$name.json" <<'PY'
import json, sys
name, rc, t0, t1, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
try:
    doc = json.load(open(path))
except (OSError, ValueError):
    doc = {}
print(json.dumps({"run": name, "exit_status": rc, "wall_s": round(t1 - t0, 2), "seconds": doc.get("seconds"),
                  "realised_sparsity": doc.get("realised_sparsity")}))
PY
)")
}

if [ -z "$MODEL" ]; then
    echo '{"error": "no model: builtin:smollm2-135m is not installed and gpu_check.py built none"}' \
        > "$OUT/gpu_distributed.json"
    exit 0
fi
for method in wanda sparsegpt; do
    PRUNE=(prune "$MODEL" --method "$method" --uniform -s 0.5 "${DATA[@]}" --device "$DEVICE" --json -q --force)
    run "$method-nccl1" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m owlctl "${PRUNE[@]}" \
        -o "$WORK/$method-nccl1"
    run "$method-plain" "$PY" -m owlctl "${PRUNE[@]}" -o "$WORK/$method-plain"
done

"$PY" - "$OUT/gpu_distributed.json" "$MODEL" "$WORK" "${rows[@]}" <<'PY'
import json, sys
from pathlib import Path
out, model, work, rows = sys.argv[1], sys.argv[2], Path(sys.argv[3]), [json.loads(r) for r in sys.argv[4:]]
eq = {}
for method in ("wanda", "sparsegpt"):
    a, b = work / f"{method}-nccl1", work / f"{method}-plain"
    if not (a.is_dir() and b.is_dir()):
        eq[method] = None
        continue
    from safetensors.torch import load_file
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    total = sum(t.numel() for t in ta.values())
    agree = sum(int(((ta[k] == 0) == (tb[k] == 0)).sum()) for k in ta)
    eq[method] = {"mask_agreement": agree / total, "weights_bit_identical": all(bool((ta[k] == tb[k]).all()) for k in ta)}
json.dump({"model": model, "runs": rows, "nccl1_vs_plain": eq}, open(out, "w"), indent=2)
print(json.dumps({"runs": rows, "nccl1_vs_plain": eq}, indent=2))
PY
rm -rf "$WORK"/wanda-* "$WORK"/sparsegpt-*
exit 0
