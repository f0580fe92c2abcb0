"""The sparsity audit: exact zeros of every prunable Linear of a live model, per block, against the allocation
and the prune report a checkpoint records (pre-existing zeros counted apart from pruned ones)."""

from __future__ import annotations

from typing import Any, Sequence


NO_ALLOCATION = "no allocation recorded"


# ------------------------------------------------------------------------------------------- audit
def _rounding_slack(in_features: Sequence[int]) -> float:
    """Largest gap between allocated and realised sparsity that rounding explains: Wanda floors the pruned
    count per row, so a row loses up to one weight less than C_in * s; other groupings lose less."""
    return 1.0 / min(in_features) + 1e-9


def audit_sparsity(model: Any, records: dict | None = None) -> dict:
    """Realised sparsity (exact zeros of the live weights) per block and per prunable Linear, checked against
    the allocation in ``records`` ({"allocation": doc|None, "report": doc|None}, as read_checkpoint_records
    returns). A block is a mismatch when:
      - unstructured, with the prune report's expected counts: its zeros != the expected pruned count plus
        the zeros the weights already had (report zeros - report pruned);
      - unstructured, without them: |realised - allocated| > 1/min(C_in) + 1e-9 (per-row rounding slack);
      - N:M (n_keep kept per group of m): any group of m inputs keeps more than n_keep non-zeros, or its
        zeros differ as above (rows x C_in/m x (m - n_keep) expected).
    Zeros the weights had before pruning are reported apart (``preexisting_zeros``, from the prune report;
    null without one): ``realised`` counts every exact zero, ``pruned`` the mask positions (what the
    allocation asked for), ``preexisting`` the zeros found before pruning, some of which a mask may select.
    Returns {"status": "ok" | "mismatch" | "no allocation recorded", "realised_sparsity", "allocated_sparsity",
    "pruned_sparsity", "preexisting_sparsity", "pattern", "allocator", "blocks": [...], "mismatches": [...]}."""
    import torch

    from owlctl.families import resolve

    layout = resolve(model)
    records = records or {}
    alloc, report = records.get("allocation"), records.get("report")
    mismatches: list[dict] = []
    pattern = alloc["pattern"] if alloc else None
    nm_m = int(pattern["m"]) if pattern and pattern.get("kind") == "nm" else None
    alloc_blocks = alloc["blocks"] if alloc else None
    if alloc_blocks is not None and len(alloc_blocks) != layout.num_blocks:
        mismatches.append({"block": None, "name": None, "linear": None,
                           "reason": f"the allocation has {len(alloc_blocks)} blocks but the model has "
                                     f"{layout.num_blocks}"})
        alloc_blocks = None
    rep_blocks = {b["index"]: {r["name"]: r for r in b.get("linears", [])} for b in (report or {}).get("blocks", [])}
    rows: list[dict] = []
    with torch.inference_mode():
        for i in range(layout.num_blocks):
            lins = layout.linears(i)
            ab = alloc_blocks[i] if alloc_blocks is not None else None
            n_keep = int(ab["n_keep"]) if (ab is not None and nm_m is not None) else None
            counts = []
            for lin in lins.values():
                w = lin.weight
                zeros = (w == 0).sum()
                if n_keep is not None and w.shape[1] % nm_m == 0:
                    groups = (w != 0).reshape(w.shape[0], w.shape[1] // nm_m, nm_m).sum(-1)
                    over = (groups > n_keep).sum()
                else:
                    over = torch.zeros((), dtype=zeros.dtype, device=zeros.device)
                counts.append(torch.stack([zeros, over]))
            values = torch.stack(counts).cpu().tolist()  # one sync per block
            rows.append(_audit_block(i, layout.block_name(i), lins, values, ab, nm_m, rep_blocks.get(i),
                                     mismatches))
    numel = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    allocated = None
    if alloc_blocks is not None:
        allocated = sum(r["allocated_sparsity"] * r["numel"] for r in rows) / numel if numel else 0.0
    status = NO_ALLOCATION if alloc is None else ("mismatch" if mismatches else "ok")

    def total(key: str) -> int | None:
        vals = [r[key] for r in rows]
        return None if any(v is None for v in vals) else sum(vals)

    pre, pruned = total("preexisting_zeros"), total("pruned")
    return {"status": status, "realised_sparsity": zeros / numel if numel else 0.0, "allocated_sparsity": allocated,
            "pruned_sparsity": None if pruned is None or not numel else pruned / numel,
            "preexisting_sparsity": None if pre is None or not numel else pre / numel,
            "numel": numel, "zeros": zeros, "preexisting_zeros": pre, "pruned": pruned, "pattern": pattern,
            "allocator": ((alloc or {}).get("params") or {}).get("allocator"),
            "expected_counts": report is not None, "blocks": rows, "mismatches": mismatches}


def _audit_block(i: int, name: str, lins: dict, values: list, ab: dict | None, nm_m: int | None,
                 rep: dict | None, mismatches: list[dict]) -> dict:
    lin_rows = []
    for (lname, lin), (zeros, over) in zip(lins.items(), values):
        out_f, in_f = lin.weight.shape
        expected = None
        r = (rep or {}).get(lname)
        same = r is not None and r.get("numel") == out_f * in_f
        if ab is not None and same:
            natural = max(0, int(r["zeros"]) - int(r["pruned"]))  # zeros the mask did not make
            planned = int(r["expected_pruned"]) if int(r["expected_pruned"]) >= 0 else int(r["pruned"])
            expected = planned + natural
        pre = int(r["preexisting_zeros"]) if same and r.get("preexisting_zeros") is not None else None
        pruned = int(r["pruned"]) if same and ab is not None and r.get("pruned") is not None else None
        lin_rows.append({"name": lname, "shape": [out_f, in_f], "numel": out_f * in_f, "zeros": int(zeros),
                         "realised_sparsity": zeros / (out_f * in_f), "preexisting_zeros": pre, "pruned": pruned,
                         "expected_zeros": expected,
                         "nm_violations": int(over) if nm_m is not None and ab is not None else None})
    numel = sum(r["numel"] for r in lin_rows)
    zeros = sum(r["zeros"] for r in lin_rows)

    def total(key: str) -> int | None:
        vals = [r[key] for r in lin_rows]
        return None if any(v is None for v in vals) else sum(vals)

    pre_b, pruned_b = total("preexisting_zeros"), total("pruned")
    row: dict[str, Any] = {"index": i, "name": name, "numel": numel, "zeros": zeros,
                           "realised_sparsity": zeros / numel if numel else 0.0,
                           "pruned_sparsity": None if pruned_b is None or not numel else pruned_b / numel,
                           "preexisting_sparsity": None if pre_b is None or not numel else pre_b / numel,
                           "preexisting_zeros": pre_b, "pruned": pruned_b, "allocated_sparsity": None, "n_keep": None,
                           "expected_zeros": None, "check": None, "ok": None, "linears": lin_rows}
    if ab is None:
        return row
    allocated = float(ab["sparsity"]) if nm_m is None else 1.0 - int(ab["n_keep"]) / nm_m
    row.update(allocated_sparsity=allocated, n_keep=ab.get("n_keep"))
    problems: list[dict] = []
    if all(r["expected_zeros"] is not None for r in lin_rows):
        row["check"] = "report counts"
        row["expected_zeros"] = sum(r["expected_zeros"] for r in lin_rows)
        for r in lin_rows:
            if r["zeros"] != r["expected_zeros"]:
                problems.append({"linear": r["name"], "reason": f"{r['zeros']} zeros, expected "
                                 f"{r['expected_zeros']} ({r['zeros'] - r['expected_zeros']:+d})"})
    else:
        slack = _rounding_slack([r["shape"][1] for r in lin_rows])
        row["check"] = f"|realised - allocated| <= {slack:.2e}"
        if abs(row["realised_sparsity"] - allocated) > slack:
            problems.append({"linear": None, "reason": f"realised {row['realised_sparsity']:.6f} vs allocated "
                             f"{allocated:.6f} (diff {row['realised_sparsity'] - allocated:+.6f}, slack {slack:.2e})"})
    if nm_m is not None:
        row["check"] += f"; every group of {nm_m} keeps <= {ab['n_keep']}"
        for r in lin_rows:
            if r["shape"][1] % nm_m:
                problems.append({"linear": r["name"], "reason": f"{r['shape'][1]} inputs not divisible by M={nm_m}"})
            elif r["nm_violations"]:
                problems.append({"linear": r["name"], "reason": f"{r['nm_violations']} groups of {nm_m} keep more "
                                 f"than {ab['n_keep']} weights"})
    row["ok"] = not problems
    for p in problems:
        mismatches.append({"block": i, "name": name, "realised_sparsity": row["realised_sparsity"],
                           "allocated_sparsity": allocated, **p})
    return row
