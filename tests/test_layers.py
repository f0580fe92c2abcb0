"""The one dependency rule, read from the code: every import (at module level or inside a function) goes to
the same or a lower layer; core imports nothing of owlctl but core. docs/architecture.md draws the layers."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "owlctl"

# layer of a module, by its dotted name's first match (longest prefix first)
LAYERS = [("owlctl.cli", 7), ("owlctl.ops", 6), ("owlctl.api", 5), ("owlctl.deploy", 5), ("owlctl.engine", 4),
          ("owlctl.formats", 3), ("owlctl.families", 2), ("owlctl.options", 2), ("owlctl.core", 1),
          ("owlctl.progress", 0), ("owlctl.errors", 0)]


def layer(module: str) -> int | None:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    return None  # the package root (__version__, the lazy API)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported owlctl module) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("owlctl")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("owlctl") and not node.level:
            out += [(node.lineno, node.module + "." + a.name if node.module in ("owlctl.engine", "owlctl.deploy",
                                                                               "owlctl.formats", "owlctl.core")
                     else node.module) for a in node.names]
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_import_runs_up_a_layer():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        mine = layer(me)
        if mine is None:
            continue
        for line, target in imports(path):
            theirs = layer(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line} ({me}, layer {mine}) imports {target} "
                             f"(layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_core_imports_only_core():
    wrong = [f"{p.relative_to(PKG.parent)}:{line} imports {t}" for p in sorted((PKG / "core").rglob("*.py"))
             for line, t in imports(p) if not t.startswith("owlctl.core")]
    assert not wrong, "\n".join(wrong)
