"""Pruned checkpoints: a Hugging Face model directory that plain transformers loads, plus owlctl's records.

Layout of a checkpoint written by owlctl:
    config.json, generation_config.json, tokenizer files     (transformers' own)
    model.safetensors (or shards + index)                     zeros stored densely; header metadata carries
                                                              owlctl.version, owlctl.allocation (JSON) and
                                                              owlctl.allocation_sha256
    allocation.json                                           the allocation used (owlctl.allocation/1)
    owlctl-report.json                                        realised sparsity per block and matrix
    owlctl-source.json                                        the model it was pruned from
The directory is built under a temporary name beside the target and renamed at the end, so an interrupted
run leaves no half checkpoint.
"""

from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from owlctl import __version__
from owlctl.errors import FormatError
from owlctl.formats._io import check_schema, dumps, header
from owlctl.formats.claims import OutputClaim

REPORT = "owlctl-report.json"
# What an export or a packed directory copies from the model directory beside its weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json", "allocation.json", "owlctl-report.json", "owlctl-source.json")
ALLOCATION = "allocation.json"
SOURCE = "owlctl-source.json"


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise FormatError(f"{path} is not a safetensors file")
        return dict(json.loads(f.read(n)).get("__metadata__") or {})


@contextmanager
def checkpoint_writer(output: Path, force: bool, claim: OutputClaim | None = None,
                      inputs: Any = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``output``; on any failure it is removed.
    With ``claim`` (taken at the start of the command) its temporary directory is used and committed."""
    if claim is not None:
        assert claim.tmp is not None
        yield claim.tmp
        claim.commit()
        return
    with OutputClaim(output, force=force, kind="dir", inputs=inputs) as own:
        assert own.tmp is not None
        yield own.tmp
        own.commit()


def owlctl_metadata(allocation: dict | None) -> dict[str, str]:
    """The safetensors header metadata owlctl writes into every weight file of a checkpoint."""
    from owlctl.formats.allocation import allocation_sha256

    meta = {"owlctl.version": __version__}
    if allocation is not None:
        meta["owlctl.allocation"] = json.dumps(allocation, separators=(",", ":"))
        meta["owlctl.allocation_sha256"] = allocation_sha256(allocation)
    return meta


class WeightsWriter:
    """The weight files of a checkpoint of ``model`` (a live model or a meta skeleton), written tensor by
    tensor as they become final (formats/shards.py): a block's tensors as soon as it is pruned, the rest at
    the end. ``names``: model tensor name -> the name it has in the source checkpoint (kept, so tools that
    read the original names read the pruned model too); ``dtype``: floating tensors are stored in it."""

    def __init__(self, tmp: Path, model: Any, allocation: dict | None, names: dict[str, str] | None = None,
                 dtype: Any = None, max_shard_bytes: int | None = None) -> None:
        from owlctl.formats.shards import DEFAULT_MAX_SHARD_BYTES, Entry, ShardWriter, plan_of

        self.model, self.dtype = model, dtype
        self.names = names or {}
        plan = plan_of(model, dtype)
        self.file_name = {e.name: self.names.get(e.name, e.name) for e in plan}
        self.writer = ShardWriter(tmp, [Entry(self.file_name[e.name], e.dtype, e.shape) for e in plan],
                                  owlctl_metadata(allocation), max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        self.pending = {e.name for e in plan}

    def write(self, name: str, tensor: Any) -> None:
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        self.writer.write(self.file_name[name], tensor)
        self.pending.discard(name)

    def write_module(self, prefix: str, module: Any) -> None:
        """Every tensor of ``module`` (named ``prefix``.*) that the plan holds."""
        from owlctl.formats.shards import state_entries

        for name, t in state_entries(module):
            full = f"{prefix}.{name}"
            if full in self.pending:
                self.write(full, t)

    def write_rest(self, tensor_of: Any) -> None:
        """Every tensor not written yet, from ``tensor_of(model name)``, one at a time."""
        for name in [n for n in self.file_name if n in self.pending]:
            self.write(name, tensor_of(name))

    def close(self) -> list[Path]:
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


def write_records(tmp: Path, model: Any, tokenizer: Any, *, allocation: dict | None, report: dict | None,
                  source: dict, source_dir: Path | None = None) -> None:
    """config.json, generation_config.json, the tokenizer and owlctl's records beside the weights."""
    model.config.save_pretrained(tmp)
    gen = Path(source_dir) / "generation_config.json" if source_dir is not None else None
    if gen is not None and gen.is_file():
        shutil.copy2(gen, tmp / gen.name)
    elif getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if allocation is not None:
        (tmp / ALLOCATION).write_text(dumps(allocation))
    if report is not None:
        from owlctl.formats.documents import validate

        (tmp / REPORT).write_text(dumps(validate("report", report)))
    (tmp / SOURCE).write_text(dumps(source))


def save_checkpoint(model: Any, tokenizer: Any, output: Path, *, force: bool, allocation: dict | None,
                    report: dict | None, source: dict, dtype: Any = None, claim: OutputClaim | None = None,
                    names: dict[str, str] | None = None, source_dir: Path | None = None) -> Path:
    """Write a live model as an owlctl checkpoint (the same files a streamed prune writes block by block)."""
    with checkpoint_writer(output, force, claim) as tmp:
        weights = WeightsWriter(tmp, model, allocation, names, dtype)
        try:
            weights.write_rest(dict(_state(model)).__getitem__)
            weights.close()
        except BaseException:
            weights.abort()
            raise
        write_records(tmp, model, tokenizer, allocation=allocation, report=report, source=source,
                      source_dir=source_dir)
    return output


def _state(model: Any) -> list:
    from owlctl.formats.shards import state_entries

    return state_entries(model)


def read_checkpoint_records(path: Path) -> dict:
    """owlctl's records of a checkpoint directory: allocation (from safetensors metadata, else the sidecar),
    report and source. Missing records are None (e.g. a checkpoint not written by owlctl)."""
    path = Path(path)
    allocation = None
    sts = sorted(path.glob("*.safetensors"))
    if sts:
        meta = read_safetensors_metadata(sts[0])
        if "owlctl.allocation" in meta:
            try:
                allocation = json.loads(meta["owlctl.allocation"])
            except json.JSONDecodeError:
                raise FormatError(f"{sts[0]}: owlctl.allocation metadata is not valid JSON") from None
    if allocation is None and (path / ALLOCATION).is_file():
        allocation = json.loads((path / ALLOCATION).read_text())
    if allocation is not None:
        allocation = check_schema(allocation, "allocation", source=str(path))
    report = json.loads((path / REPORT).read_text()) if (path / REPORT).is_file() else None
    if report is not None:
        report = check_schema(report, "report", source=str(path / REPORT))
    source = json.loads((path / SOURCE).read_text()) if (path / SOURCE).is_file() else None
    return {"allocation": allocation, "report": report, "source": source}


def report_doc(model_info: dict, method: str, pattern: dict, blocks: list[dict], seconds: dict,
               command: str = "prune") -> dict:
    """The prune report. Sparsities are fractions of the prunable weights: ``realised`` = all exact zeros
    after pruning, ``pruned`` = the masks' positions, ``preexisting`` = zeros the weights had before pruning
    (a mask may select them), ``newly_zeroed`` = mask positions that were non-zero."""
    total = sum(b["numel"] for b in blocks)

    def frac(key: str) -> float | None:
        if any(key not in b for b in blocks):
            return None
        return sum(b[key] for b in blocks) / total if total else 0.0

    return {**header("report", command, model_info, seconds), "method": method, "pattern": pattern,
            "realised_sparsity": frac("zeros"), "pruned_sparsity": frac("pruned"),
            "preexisting_sparsity": frac("preexisting_zeros"), "newly_zeroed_sparsity": frac("newly_zeroed"),
            "blocks": blocks}


def copy_side_files(src: Path | None, dst: Path, tok: Any = None, model: Any = None) -> None:
    """Copy config, tokenizer and owlctl records from ``src`` into ``dst`` (what is not there yet); the
    tokenizer and config are saved from the live objects when the source has none."""
    for f in SIDE_FILES:
        if src is not None and (Path(src) / f).is_file() and not (dst / f).exists():
            shutil.copy2(Path(src) / f, dst / f)
    if tok is not None and not (dst / "tokenizer_config.json").exists():
        tok.save_pretrained(dst)
    if model is not None and not (dst / "config.json").exists():
        model.config.save_pretrained(dst)
