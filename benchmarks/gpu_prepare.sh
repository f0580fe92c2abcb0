#!/usr/bin/env bash
# Run HERE (the development machine, with the project's venv) before benchmarks/gpu_check.sh runs on a GPU
# machine that cannot download anything. Fills .gpu/ (git-ignored, a few MB) with:
#   wheels/  the Python packages owlctl needs that the GPU image lacks (msgspec), for CPython 3.12 x86-64
#   tok/     the built-in SmolLM2 tokenizer (the synthetic model on the GPU uses it)
#   calib.txt  calibration / evaluation text: the built-in corpus's documents, one paragraph each
# Then carry it:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tok
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d .gpu/wheels "msgspec>=0.18"
"$PY" - <<'PY'
from pathlib import Path
from owlctl.engine.models import builtin_model_dir
from owlctl.engine.data.sources import wiki_articles

src = builtin_model_dir("builtin:smollm2-135m")
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (src / f).is_file():
        (Path(".gpu/tok") / f).write_bytes((src / f).read_bytes())
docs = [d.replace("\n\n", "\n").strip() for d in wiki_articles("calib")[:3000]]
text = "\n\n".join(d for d in docs if d)
Path(".gpu/calib.txt").write_text(text, encoding="utf-8")
print(f".gpu ready: {len(docs)} documents, {len(text) / 1e6:.1f} MB of text")
PY
du -sh .gpu
