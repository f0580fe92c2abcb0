"""Every document owlctl prints (``--json``) or writes, as typed structures (msgspec Structs).

One envelope for all of them: ``schema`` (``owlctl.<kind>/<version>``), ``owlctl_version``, ``created``,
``command`` (the command that made it), ``model`` (one shape, :class:`ModelRef`, everywhere), ``seconds``
(phase -> seconds), then the command's own fields. One name per concept: ``target_sparsity`` (asked),
``allocated_sparsity`` (the allocation's parameter-weighted mean), ``realised_sparsity`` (exact zeros after
pruning), ``pruned_sparsity`` (positions the masks cover), ``preexisting_sparsity`` (zeros before pruning);
``comparison`` for a side-by-side; ``perplexity`` is always {source: :class:`Perplexity`}.

Documents stay plain dicts in code (what JSON gives back); these Structs are their definition: every document
is checked against its Struct when it is printed or written and when it is read back (``validate``), and
``scripts/gen_docs.py`` writes one JSON Schema per kind into docs/schemas/. Semantic checks (counts within
numel, M keys matching outlier_m, ...) stay in the per-format readers. Older versions are read and upgraded
(``upgrade``). msgspec is imported only when a document is checked, so start-up does not pay for it.

Why one module of ~500 lines: every document type in one place, so the envelope, the JSON Schemas and
the validators are generated from one list and a reader sees every contract side by side.
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec
from msgspec import Struct

from owlctl.formats.kinds import VERSIONS, parse_schema, schema_name

Seconds = dict[str, float]


# ------------------------------------------------------------------------------------------------ shared
class PrunedFrom(Struct, kw_only=True):
    id: str
    content_sha256: Optional[str] = None
    method: Optional[str] = None
    finetuned_from: Optional[str] = None
    finetune_mode: Optional[str] = None


class ModelRef(Struct, kw_only=True):
    """The model a document is about. ``id`` is what it is (a checkpoint: the model it was pruned from),
    ``spec`` what was given on the command line."""

    id: str
    spec: Optional[str] = None
    path: Optional[str] = None
    revision: Optional[str] = None
    content_sha256: Optional[str] = None
    model_type: Optional[str] = None
    family: Optional[str] = None
    num_blocks: Optional[int] = None
    trust_remote_code: Optional[bool] = None
    pruned_from: Optional[PrunedFrom] = None


class Envelope(Struct, kw_only=True):
    schema: str
    owlctl_version: str
    created: str
    command: str
    model: Optional[ModelRef]
    seconds: Seconds


class Split(Struct, kw_only=True):
    rule: str
    unit: Optional[str] = None
    documents: Optional[int] = None
    calib_documents: Optional[int] = None
    source_sha256: Optional[str] = None


class Fingerprint(Struct, kw_only=True):
    text_sha256: str
    paragraphs: dict[str, Any]


class Calibration(Struct, kw_only=True):
    source: str
    nsamples: int
    seqlen: int
    seed: int
    tokens_sha256: str
    bos: Optional[str] = None
    bos_requested: Optional[str] = None
    split: Optional[Split] = None
    fingerprint: Optional[Fingerprint] = None


class Pattern(Struct, kw_only=True):
    kind: str  # "unstructured" | "nm"
    n_keep: Optional[int] = None
    m: Optional[int] = None


class Perplexity(Struct, kw_only=True):
    source: str
    split: str
    ppl: Optional[float]
    nll_mean: float
    windows: int
    tokens: int
    predictions: int
    seqlen: int
    window_nll: list[float]
    stream_tokens: int
    windows_sha256: str
    bos: Optional[str] = None
    stream_tokens_used: Optional[int] = None


# ------------------------------------------------------------------------------------------------ profile
class ProfileLinear(Struct, kw_only=True):
    name: str
    shape: list[int]
    numel: int
    score_sum: float
    max_score: float
    outlier_count: dict[str, int]


class ProfileBlock(Struct, kw_only=True):
    index: int
    name: str
    numel: int
    mean_score: float
    score_sum: float
    outlier_count: dict[str, int]
    outlier_pct: dict[str, float]
    linears: list[ProfileLinear]


class ProfileDoc(Envelope, kw_only=True):
    calibration: Calibration
    score: dict[str, str]
    outlier_m: list[float]
    blocks: list[ProfileBlock]
    output: Optional[str] = None
    peak_rss_mb: Optional[float] = None
    peak_cuda_mb: Optional[float] = None


# ------------------------------------------------------------------------------------------------ allocation
class ProfileRef(Struct, kw_only=True):
    sha256: Optional[str]
    path: Optional[str]
    calibration: Optional[Calibration] = None


class SearchSeed(Struct, kw_only=True):
    """One starting point of ``owlctl search``: uniform, or OWL at (M, lambda), snapped onto the level grid."""

    name: str
    outlier_m: Optional[float]
    lam: Optional[float] = msgspec.field(name="lambda")
    offsets: list[int]  # level steps per block from the target (unstructured) or from N (mixed N:M)
    objective: float


class SearchRound(Struct, kw_only=True):
    generation: int
    evaluations: int
    best_objective: float
    screen_windows: int
    improved: bool
    seconds: float


class SearchObjectiveData(Struct, kw_only=True):
    source: str
    split: str  # never "test"
    windows: int
    seqlen: int
    topk: int
    bos: str
    windows_sha256: str


class SearchLevels(Struct, kw_only=True):
    built_from: str  # "uniform path": each block calibrated on the inputs of the uniformly pruned earlier blocks
    step: float  # sparsity per step (unstructured) or 1 (weights kept per group, mixed N:M)
    values: list[float]  # every level: sparsity, or N kept per group of M


class SearchVerified(Struct, kw_only=True):
    """The winner after a real sequential prune with its allocation, on the same objective."""

    objective: float
    database_objective: float
    uniform_objective: float
    chosen: str  # "search" | "uniform" (when the real prune of the winner scored worse than uniform)


class SearchInfo(Struct, kw_only=True):
    """What ``owlctl search`` measured and how (params.search of an allocation it wrote)."""

    mode: str  # "evolve" | "owl-grid"
    objective: str
    definition: str
    objective_data: SearchObjectiveData
    method: str
    method_options: dict[str, Any]
    levels: SearchLevels
    budget: dict[str, Any]
    seed: int
    calibration_sha256: str
    data_sha256: str
    seeds: list[SearchSeed]
    uniform_objective: float
    best_seed: str
    best_seed_objective: float
    winner_objective: float
    evaluations: int
    generations: int
    improvements: int
    stopped: str = "budget"  # "budget" | "exhausted" | "owl-grid"
    window_forwards: int
    rounds: list[SearchRound]
    verified: Optional[SearchVerified]
    chosen: str
    database: str
    seconds: Seconds


class AllocationParams(Struct, kw_only=True):
    allocator: str
    target_sparsity: Optional[float]
    outlier_m: Optional[float]
    # "lambda" is a Python keyword
    lam: Optional[float] = msgspec.field(name="lambda")
    balance: str
    clamp: str
    min_sparsity: float
    max_sparsity: float
    special: bool
    search: Optional[SearchInfo] = None  # written by `owlctl search`


class AllocationBlock(Struct, kw_only=True):
    index: int
    name: str
    numel: int
    outlier_pct: Optional[float]
    sparsity: float
    n_keep: Optional[int]


class AllocationDoc(Envelope, kw_only=True):
    profile: ProfileRef
    params: AllocationParams
    pattern: Pattern
    blocks: list[AllocationBlock]
    target_sparsity: Optional[float]
    allocated_sparsity: float
    mean_block_sparsity: float
    drift: Optional[float]


# ------------------------------------------------------------------------------------------------ prune
class ReportLinear(Struct, kw_only=True):
    """``pruned`` mask positions, ``zeros`` exact zeros after pruning, ``preexisting_zeros`` before it,
    ``newly_zeroed`` mask positions that held a non-zero weight; ``expected_pruned`` what the method's
    comparison group must prune (-1: data-dependent, or not known for a checkpoint owlctl did not prune)."""

    name: str
    shape: list[int]
    numel: int
    pruned: int
    zeros: int
    realised_sparsity: float
    expected_pruned: int
    preexisting_zeros: Optional[int] = None
    newly_zeroed: Optional[int] = None


class ReportBlock(Struct, kw_only=True):
    index: int
    name: str
    numel: int
    zeros: int
    realised_sparsity: float
    target_sparsity: Optional[float]
    n_keep: Optional[int]
    linears: list[ReportLinear]
    pruned: Optional[int] = None
    preexisting_zeros: Optional[int] = None
    newly_zeroed: Optional[int] = None


class ReportDoc(Envelope, kw_only=True):
    method: str
    pattern: Pattern
    realised_sparsity: Optional[float]
    pruned_sparsity: Optional[float]
    preexisting_sparsity: Optional[float]
    newly_zeroed_sparsity: Optional[float]
    blocks: list[ReportBlock]
    calibration: Optional[Calibration] = None
    method_options: Optional[dict[str, Any]] = None
    finetune: Optional[dict[str, Any]] = None


class PruneBlock(Struct, kw_only=True):
    index: int
    target_sparsity: Optional[float]
    realised_sparsity: float


class PruneDoc(Envelope, kw_only=True):
    output: Optional[str]
    method: str
    allocator: str
    pattern: Pattern
    target_sparsity: Optional[float]
    allocated_sparsity: float
    realised_sparsity: float
    pruned_sparsity: float
    preexisting_sparsity: float
    mask_mismatches: int
    blocks: list[PruneBlock]
    calibration: Optional[Calibration]
    peak_rss_mb: float
    model_mb: float
    peak_cuda_mb: Optional[float] = None


# ------------------------------------------------------------------------------------------------ eval
class AuditLinear(Struct, kw_only=True):
    name: str
    shape: list[int]
    numel: int
    zeros: int
    realised_sparsity: float
    preexisting_zeros: Optional[int]
    pruned: Optional[int]
    expected_zeros: Optional[int]
    nm_violations: Optional[int]


class AuditBlock(Struct, kw_only=True):
    index: int
    name: str
    numel: int
    zeros: int
    realised_sparsity: float
    pruned_sparsity: Optional[float]
    preexisting_sparsity: Optional[float]
    preexisting_zeros: Optional[int]
    pruned: Optional[int]
    allocated_sparsity: Optional[float]
    n_keep: Optional[int]
    expected_zeros: Optional[int]
    check: Optional[str]
    ok: Optional[bool]
    linears: list[AuditLinear]


class Audit(Struct, kw_only=True):
    status: str
    realised_sparsity: float
    allocated_sparsity: Optional[float]
    pruned_sparsity: Optional[float]
    preexisting_sparsity: Optional[float]
    numel: int
    zeros: int
    preexisting_zeros: Optional[int]
    pruned: Optional[int]
    pattern: Optional[Pattern]
    allocator: Optional[str]
    expected_counts: bool
    blocks: list[AuditBlock]
    mismatches: list[dict[str, Any]]


class EvalComparison(Struct, kw_only=True):
    model: ModelRef
    perplexity: dict[str, Perplexity]
    audit: Audit
    zeroshot: Optional[dict[str, Any]]
    seconds: Seconds
    ratio: dict[str, Optional[float]]
    identical_windows: bool


class EvalDoc(Envelope, kw_only=True):
    settings: dict[str, Any]
    perplexity: dict[str, Perplexity]
    audit: Audit
    zeroshot: Optional[dict[str, Any]]
    comparison: Optional[EvalComparison]


# ------------------------------------------------------------------------------------------------ pipeline
class PipelineResult(Struct, kw_only=True):
    variant: str
    perplexity: dict[str, Perplexity]
    realised_sparsity: float
    preexisting_sparsity: Optional[float]
    block_sparsity_min: float
    block_sparsity_max: float
    prune_seconds: float


class PipelineDoc(Envelope, kw_only=True):
    method: str
    target_sparsity: float
    outlier_m: float
    lam: float = msgspec.field(name="lambda")
    calibration: Calibration
    evaluation: dict[str, Any]
    results: list[PipelineResult]
    owl_block_sparsity: list[float]
    outlier_pct: list[float]
    checkpoints: dict[str, str]
    peak_rss_mb: float
    full_size_hint: str


# ------------------------------------------------------------------------------------------------ finetune
class FinetuneDoc(Envelope, kw_only=True):
    output: str
    checkpoint: str
    mode: str
    lora: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    eval: dict[str, Any]
    delta_removed: Optional[dict[str, Any]]
    sparsity: dict[str, Any]
    warnings: list[str]
    peak_rss_mb: float
    config: dict[str, Any]
    process: dict[str, Any]


# ------------------------------------------------------------------------------------------------ export
class PackedTensor(Struct, kw_only=True):
    name: str
    shape: Optional[list[int]] = None
    dtype: Optional[str] = None
    sha256: Optional[str] = None
    encoding: Optional[str] = None
    nnz: Optional[int] = None
    numel: Optional[int] = None
    alias_of: Optional[str] = None


class PackedDoc(Envelope, kw_only=True):
    """packed.json of a packed directory (also what ``export --format packed`` reports)."""

    model_type: str
    torch_dtype: str
    encoding: dict[str, str]
    tensors: list[PackedTensor]
    packed_tensors: int
    packed_numel: int
    packed_nnz: int
    realised_sparsity: float
    dense_bytes: int
    packed_bytes: int
    size_ratio: Optional[float]


class OnnxGraph(Struct, kw_only=True):
    file: str
    kv_cache: bool
    opset: int
    ir_version: int
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, Any]
    geometry: Optional[dict[str, Any]]
    vocab_size: int
    dtype: str
    position_ids: str
    exporter: str
    attention: str


class ExportDoc(Envelope, kw_only=True):
    """What ``export`` reports; for ONNX also written as onnx-export.json beside the graph."""

    format: str
    output: Optional[str] = None
    files: list[str]
    dense_safetensors_bytes: Optional[int] = None
    onnx: Optional[dict[str, Any]] = None  # {graph: OnnxGraph, verification, onnx_bytes}
    packed: Optional[dict[str, Any]] = None  # the packed header's summary


# ------------------------------------------------------------------------------------------------ bench
class ReadBandwidth(Struct, kw_only=True):
    """The probe of ``owlctl bench`` (``--no-probe``: absent): read GB/s of ``threads`` threads, or why not."""

    gb_per_s: Optional[float]
    bytes: Optional[int] = None
    threads: Optional[int] = None
    isa: Optional[str] = None
    seconds: Optional[list[float]] = None
    load_average_1m: Optional[float] = None
    statistic: Optional[str] = None
    skipped: Optional[str] = None


class RowBandwidth(Struct, kw_only=True):
    """Weight bytes one decode step reads / the median step's seconds (rows[].bandwidth)."""

    linear_bytes_per_step: int
    model_bytes_per_step: int
    step_seconds: float
    linear_gb_per_s: float
    model_gb_per_s: float
    linear_fraction_of_probe: Optional[float] = None
    model_fraction_of_probe: Optional[float] = None


class BenchRow(Struct, kw_only=True):
    label: str
    model: dict[str, Any]
    backend: str
    kernel: Optional[str] = None
    prefill: dict[str, Any]
    decode: dict[str, Any]
    memory: dict[str, Any]
    load_seconds: Optional[float] = None
    max_abs_diff_vs_torch: Optional[float] = None
    bandwidth: Optional[RowBandwidth] = None
    details: Optional[dict[str, Any]] = None


class BenchDoc(Envelope, kw_only=True):
    settings: dict[str, Any]
    host: dict[str, Any]
    models: dict[str, dict[str, Any]]
    rows: list[BenchRow]
    comparison: Optional[dict[str, Any]]
    logits_check: dict[str, Any]
    deepsparse_setup: Optional[dict[str, Any]] = None
    read_bandwidth: Optional[ReadBandwidth] = None


# ------------------------------------------------------------------------------------------------ generate
class GenerateTimings(Struct, kw_only=True):
    """Seconds of ``owlctl generate``: the prefill step (prompt + first token), then the decode steps."""

    load_s: float
    prefill_s: float
    prefill_tokens: int
    prefill_tokens_per_s: Optional[float]
    decode_s: float
    decode_steps: int
    decode_tokens_per_s: Optional[float]


class GeneratePrompt(Struct, kw_only=True):
    text: str
    tokens: int
    chat_template: bool


class GenerateDoc(Envelope, kw_only=True):
    backend: str
    kernel: Optional[str] = None
    isa: Optional[str] = None
    threads: int
    sparse: Optional[dict[str, Any]] = None  # what the sparse swap did (kernel, counts, bytes, a fallback)
    text: str
    prompt: GeneratePrompt
    generated_tokens: int
    token_ids: list[int]
    stop: str  # "eos" | "max_new_tokens"
    sampling: dict[str, Any]
    max_new_tokens: int
    timings: GenerateTimings


# ------------------------------------------------------------------------------------------------ registry
TYPES: dict[str, type] = {"profile": ProfileDoc, "allocation": AllocationDoc, "report": ReportDoc,
                          "prune": PruneDoc, "eval": EvalDoc, "pipeline": PipelineDoc, "finetune": FinetuneDoc,
                          "packed": PackedDoc, "export": ExportDoc, "bench": BenchDoc,
                          "generate": GenerateDoc}


def validate(kind: str, doc: Any, source: str = "document") -> dict:
    """Check ``doc`` against its Struct; a FormatError names the first wrong field (e.g. ``$.blocks[2].numel``)."""
    from owlctl.errors import FormatError

    try:
        msgspec.convert(doc, TYPES[kind], strict=False)
    except msgspec.ValidationError as e:
        raise FormatError(f"{source} is not a valid owlctl.{kind} document: {e}",
                          hint="it may be truncated, hand-edited, or written by another program") from None
    return doc


def json_schema(kind: str) -> dict:
    """The JSON Schema of one document kind (docs/schemas/<kind>.json)."""
    schema = msgspec.json.schema(TYPES[kind])
    schema["title"] = schema_name(kind)
    return schema


def upgrade(kind: str, doc: dict) -> dict:
    """A document of an older version of ``kind`` in the current shape (readers accept old files)."""
    parsed = parse_schema(doc.get("schema"))
    version = parsed[1] if parsed else 0
    if version >= VERSIONS[kind]:
        return doc
    doc = dict(doc)
    doc.setdefault("created", "")
    doc.setdefault("command", {"profile": "profile", "allocation": "allocate", "report": "prune"}.get(kind, kind))
    doc.setdefault("seconds", {})
    if kind == "allocation" and "achieved" in doc:
        a = doc.pop("achieved")
        doc.update(target_sparsity=a.get("target_sparsity"), allocated_sparsity=a.get("param_weighted_sparsity"),
                   mean_block_sparsity=a.get("mean_sparsity"), drift=a.get("drift"))
    if kind == "report":
        doc["blocks"] = [_rename(b, sparsity="realised_sparsity") for b in doc.get("blocks", [])]
        for b in doc["blocks"]:
            b["linears"] = [_rename(r, sparsity="realised_sparsity") for r in b.get("linears", [])]
    if kind in ("packed", "export") and "source" in doc:  # the model was called "source" before the envelope
        src = doc.pop("source") or {}
        doc.setdefault("model", {"id": src.get("id", "?"), "path": src.get("path"), "revision": src.get("revision"),
                                 "content_sha256": src.get("content_sha256"), "model_type": src.get("model_type")})
    if kind == "packed":
        numel, nnz = doc.get("packed_numel") or 0, doc.get("packed_nnz") or 0
        doc.setdefault("realised_sparsity", 1 - nnz / numel if numel else 0.0)
    if kind == "export" and "graph" in doc:  # owlctl.onnx/1: the ONNX description at the top level
        doc["onnx"] = {"graph": doc.pop("graph"), "verification": doc.pop("verification", None),
                       "onnx_bytes": doc.pop("onnx_bytes", None)}
        doc.setdefault("format", "onnx")
        doc.setdefault("files", [])
    doc["schema"] = schema_name(kind)
    return doc


def _rename(d: dict, **names: str) -> dict:
    d = dict(d)
    for old, new in names.items():
        if old in d and new not in d:
            d[new] = d.pop(old)
    return d
