"""Check what README command (a) printed: the dense / uniform / OWL table with dense < OWL < uniform."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
ppl = {}
for line in text.splitlines():
    cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
    if len(cells) >= 2 and cells[0] in ("dense", "wanda uniform", "wanda owl"):
        ppl[cells[0]] = float(cells[1])
print(f"perplexity from the table: {ppl}")
missing = {"dense", "wanda uniform", "wanda owl"} - set(ppl)
if missing:
    sys.exit(f"README (a): no table row for {sorted(missing)} in its output:\n{text}")
if not ppl["dense"] < ppl["wanda owl"] < ppl["wanda uniform"]:
    sys.exit(f"README (a): expected dense < OWL < uniform, got {ppl}")
print("README (a): dense < OWL < uniform")
