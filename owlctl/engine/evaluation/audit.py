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
    from owlctl.families import resolve

    layout = resolve(model)
    auditor = Auditor(records or {}, layout.num_blocks)
    for i in range(layout.num_blocks):
        auditor.block(i, layout.block_name(i), layout.linears(i))
    return auditor.summary()


class Auditor:
    """The audit block by block (so a streamed model is audited while each block is on the device), then
    the summary. ``records``: {"allocation": doc|None, "report": doc|None}."""

    def __init__(self, records: dict, num_blocks: int) -> None:
        self.alloc, self.report = records.get("allocation"), records.get("report")
        self.mismatches: list[dict] = []
        self.pattern = self.alloc["pattern"] if self.alloc else None
        self.nm_m = int(self.pattern["m"]) if self.pattern and self.pattern.get("kind") == "nm" else None
        self.alloc_blocks = self.alloc["blocks"] if self.alloc else None
        if self.alloc_blocks is not None and len(self.alloc_blocks) != num_blocks:
            self.mismatches.append({"block": None, "name": None, "linear": None,
                                    "reason": f"the allocation has {len(self.alloc_blocks)} blocks but the model has "
                                              f"{num_blocks}"})
            self.alloc_blocks = None
        self.rep_blocks = {b["index"]: {r["name"]: r for r in b.get("linears", [])}
                           for b in (self.report or {}).get("blocks", [])}
        self.rows: list[dict] = []

    def block(self, i: int, name: str, lins: dict) -> None:
        import torch

        ab = self.alloc_blocks[i] if self.alloc_blocks is not None else None
        n_keep = int(ab["n_keep"]) if (ab is not None and self.nm_m is not None) else None
        counts = []
        with torch.inference_mode():
            for lin in lins.values():
                w = lin.weight
                zeros = (w == 0).sum()
                if n_keep is not None and w.shape[1] % self.nm_m == 0:
                    groups = (w != 0).reshape(w.shape[0], w.shape[1] // self.nm_m, self.nm_m).sum(-1)
                    over = (groups > n_keep).sum()
                else:
                    over = torch.zeros((), dtype=zeros.dtype, device=zeros.device)
                counts.append(torch.stack([zeros, over]))
            values = torch.stack(counts).cpu().tolist()  # one sync per block
        self.rows.append(_audit_block(i, name, lins, values, ab, self.nm_m, self.rep_blocks.get(i),
                                      self.mismatches))

    def summary(self) -> dict:
        rows = self.rows
        numel = sum(r["numel"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        allocated = None
        if self.alloc_blocks is not None:
            allocated = sum(r["allocated_sparsity"] * r["numel"] for r in rows) / numel if numel else 0.0
        status = NO_ALLOCATION if self.alloc is None else ("mismatch" if self.mismatches else "ok")
        pre, pruned = _total(rows, "preexisting_zeros"), _total(rows, "pruned")
        return {"status": status, "realised_sparsity": zeros / numel if numel else 0.0,
                "allocated_sparsity": allocated,
                "pruned_sparsity": None if pruned is None or not numel else pruned / numel,
                "preexisting_sparsity": None if pre is None or not numel else pre / numel,
                "numel": numel, "zeros": zeros, "preexisting_zeros": pre, "pruned": pruned, "pattern": self.pattern,
                "allocator": ((self.alloc or {}).get("params") or {}).get("allocator"),
                "expected_counts": self.report is not None, "blocks": rows, "mismatches": self.mismatches}


def _total(rows: list[dict], key: str) -> int | None:
    vals = [r[key] for r in rows]
    return None if any(v is None for v in vals) else sum(vals)


def _linear_rows(lins: dict, values: list, ab: dict | None, nm_m: int | None, rep: dict | None) -> list[dict]:
    out = []
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
        out.append({"name": lname, "shape": [out_f, in_f], "numel": out_f * in_f, "zeros": int(zeros),
                    "realised_sparsity": zeros / (out_f * in_f), "preexisting_zeros": pre, "pruned": pruned,
                    "expected_zeros": expected,
                    "nm_violations": int(over) if nm_m is not None and ab is not None else None})
    return out


def _audit_block(i: int, name: str, lins: dict, values: list, ab: dict | None, nm_m: int | None,
                 rep: dict | None, mismatches: list[dict]) -> dict:
    lin_rows = _linear_rows(lins, values, ab, nm_m, rep)
    numel = sum(r["numel"] for r in lin_rows)
    zeros = sum(r["zeros"] for r in lin_rows)
    pre_b, pruned_b = _total(lin_rows, "preexisting_zeros"), _total(lin_rows, "pruned")
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
    problems = _problems(row, lin_rows, allocated, ab, nm_m)
    row["ok"] = not problems
    for p in problems:
        mismatches.append({"block": i, "name": name, "realised_sparsity": row["realised_sparsity"],
                           "allocated_sparsity": allocated, **p})
    return row


def _problems(row: dict, lin_rows: list[dict], allocated: float, ab: dict, nm_m: int | None) -> list[dict]:
    """What is wrong with one block: counts against the report, or against the allocation with rounding
    slack; N:M groups keeping too many weights. Also sets the row's ``check`` description."""
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
    return problems
