"""Print README command (a) or (b), exactly as the README's first code block writes it."""

import sys
from pathlib import Path

which = sys.argv[1]
lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
start = lines.index("```bash")
block = lines[start + 1:lines.index("```", start + 1)]
for i, line in enumerate(block):
    if line.startswith(f"# ({which})"):
        print(next(x for x in block[i + 1:] if x.strip()))
        break
else:
    sys.exit(f"README.md has no command ({which}) in its first code block")
