"""Paper-style figure of an allocation: outlier ratio per block (bars) and OWL vs uniform sparsity (lines).

matplotlib is optional (`pip install 'owlctl[plot]'`) and imported only when a figure is drawn; the
object-oriented API is used (no pyplot), so no global backend state is touched.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from owlctl.errors import InputError

FORMATS = ("png", "pdf", "svg")


def check_plot_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Everything that can fail before drawing: matplotlib present, a known suffix, no silent overwrite."""
    from owlctl.formats.claims import check_output

    p = Path(path)
    if p.suffix.lower().lstrip(".") not in FORMATS:
        raise InputError(f"cannot tell the figure format of {p}", hint=f"end the file name with .{', .'.join(FORMATS)}")
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("plotting needs matplotlib, which is not installed", hint="pip install 'owlctl[plot]'")
    return check_output(p, force, "file")


def plot_allocation(doc: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """Draw ``doc`` (an owlctl.allocation/1 document) to ``path`` (.png/.pdf/.svg), atomically."""
    p = check_plot_path(path, force)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = doc["blocks"]
    x = [b["index"] for b in blocks]
    pcts = [b["outlier_pct"] for b in blocks]
    sparsity = [100.0 * b["sparsity"] for b in blocks]
    target = doc["target_sparsity"]
    params, pattern = doc["params"], doc["pattern"]

    fig = Figure(figsize=(max(6.0, 0.25 * len(x) + 3.0), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if all(v is not None for v in pcts):
        ax.bar(x, pcts, color="#9ecae1", edgecolor="#3182bd", linewidth=0.5,
               label=f"outlier ratio D (M = {params['outlier_m']:g})")
        ax.set_ylabel("outlier ratio D_l (%)")
    else:
        ax.set_yticks([])
    ax.set_xlabel("block")
    ax2 = ax.twinx()
    label = "OWL" if params["allocator"] == "owl" else params["allocator"]
    ax2.plot(x, sparsity, color="#d62728", marker="o", markersize=3, linewidth=1.5, label=f"{label} sparsity")
    if target is not None:
        base = f"uniform {pattern['n_keep']}:{pattern['m']}" if pattern["kind"] == "nm" else "uniform"
        ax2.plot(x, [100.0 * target] * len(x), color="#555555", linestyle="--", linewidth=1.2,
                 label=f"{base} sparsity")
    ax2.set_ylabel("sparsity (%)")
    lo, hi = min(sparsity + [100.0 * (target or 0)]), max(sparsity + [100.0 * (target or 0)])
    pad = max(2.0, 0.15 * (hi - lo))
    ax2.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))

    what = (f"{pattern['n_keep']}:{pattern['m']} kept, mixed N:M" if pattern["kind"] == "nm"
            else f"S = {params['target_sparsity']:g}")
    lam = params.get("lambda")
    fig.suptitle(f"{doc['model'].get('id', 'model')}: {what}" + (f", lambda = {lam:g}" if lam is not None else ""),
                 fontsize=10)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=len(handles),
               fontsize=8, frameon=False)

    fmt = p.suffix.lower().lstrip(".")
    from owlctl.formats._io import atomic_write

    atomic_write(p, lambda f: fig.savefig(f, format=fmt, dpi=150), force=True)
    return p
