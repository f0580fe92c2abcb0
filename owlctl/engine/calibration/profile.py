"""The profile pass: one dense calibration pass that counts, per block, the Wanda scores above M x the block
mean for several M at once (SPEC 1-2). Returns the owlctl.profile document."""

from __future__ import annotations

from typing import Any


def profile_model(host: Any, tok: Any, info: Any, calib: Any, *, outlier_m: tuple[float, ...], device: str,
                  batch_size: int, progress: Any = None, command: str = "profile",
                  activations: str = "device") -> tuple[dict, Any]:
    """Profile the model of ``host`` (engine/models/hosts.py: in memory or streamed) on given calibration
    windows; returns (profile document, timings)."""
    from owlctl.core.methods import wanda_scores
    from owlctl.core.outliers import block_outliers
    from owlctl.formats._io import header
    from owlctl.formats.profile import m_key

    layout = host.layout
    blocks: list[dict] = []
    keys = [m_key(m) for m in outlier_m]

    def decide(i: int, _block: Any, linears: dict, stats: dict) -> None:
        names = list(linears)
        scores = [wanda_scores(linears[n].weight.detach(), stats[n].act_sq_norm()) for n in names]
        res = block_outliers(scores, list(outlier_m))
        blocks.append({
            "index": i, "name": layout.block_name(i), "numel": res.numel, "mean_score": res.mean_score,
            "score_sum": res.score_sum,
            "outlier_count": dict(zip(keys, res.outlier_count)),
            "outlier_pct": {k: 100.0 * c / res.numel for k, c in zip(keys, res.outlier_count)},
            "linears": [{"name": n, "shape": list(linears[n].weight.shape), "numel": m.numel,
                         "score_sum": m.score_sum, "max_score": m.max_score,
                         "outlier_count": dict(zip(keys, m.outlier_count))}
                        for n, m in zip(names, res.matrices)],
        })

    from owlctl.engine.calibration.driver import run_blocks

    timings = run_blocks(host, calib.input_ids, device=device, batch_size=batch_size,
                         needs=frozenset({"act_norm"}), decide=decide, propagate="dense", progress=progress,
                         description="profile", activations=activations)
    doc = {**header("profile", command, info.as_dict(layout.family.name, layout.num_blocks), timings.as_dict()),
           "calibration": calib.as_dict(),
           "score": {"name": "wanda", "definition": "|W_ij| * sqrt(mean_k ||X_k[:, j]||_2^2)",
                     "outlier_rule": "score > M * block mean (strict)", "pct_units": "percent"},
           "outlier_m": [float(m) for m in outlier_m],
           "blocks": blocks}
    return doc, timings
