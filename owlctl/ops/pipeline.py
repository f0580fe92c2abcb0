"""`owlctl pipeline`: the main job in one command — profile, allocate (uniform and OWL), prune both ways,
evaluate dense / uniform / OWL on identical held-out windows, print the comparison.

The model is opened and the calibration set tokenised once; the profile is one dense pass; each pruned
variant starts from the dense weights: a fresh copy in memory, or, for a model streamed from its files
(``--offload disk``), a checkpoint written block by block and evaluated block by block, so the pipeline's
memory is that of one block too. With ``output`` set, the profile, both allocations, the result document and
(with ``save_checkpoints``) both checkpoints are written into that folder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import InputError
from owlctl.options import (
    FORCE,
    LAMBDA,
    METHOD,
    MODEL,
    OUTLIER_M,
    OUTPUT,
    TARGET_SPARSITY,
    CalibrationOptions,
    ComputeOptions,
    Split,
    opt,
)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(ComputeOptions, CalibrationOptions):
    model: str = MODEL("builtin:smollm2-135m")
    method: str = METHOD("wanda")
    target_sparsity: float = TARGET_SPARSITY(0.7)
    outlier_m: float = OUTLIER_M(5.0)
    lam: float = LAMBDA(0.08)
    output: Path | None = OUTPUT(None, help="Folder for the profile, allocations and results.")
    save_checkpoints: bool = opt("--save-checkpoints", help="Also save both pruned models into --output.")(False)
    eval_data: str | None = opt("--eval-data", help="builtin:wiki | wikitext2 | c4 | a local .txt/.jsonl file "
                                "(default: builtin:wiki for built-in models, wikitext2 otherwise).")(None)
    eval_split: str = opt("--eval-split", help="Held-out split to evaluate.", choices=Split)("test")
    eval_seqlen: int | None = opt("--eval-seqlen", help="Evaluation window length.", min=2)(None)
    max_windows: int | None = opt("--max-windows", help="Evaluate at most N windows.", min=1)(None)
    force: bool = FORCE(False)


BUILTIN_PIPELINE = {"nsamples": 16, "seqlen": 256, "max_windows": 16}  # eval windows of 512 tokens

FULL_SIZE_HINT = ("full-size protocol (GPU): owlctl pipeline meta-llama/Llama-2-7b-hf --calib c4 --nsamples 128 "
                  "--seqlen 2048 --eval-data wikitext2 --eval-seqlen 2048 --device cuda -s 0.7 -m 5 -l 0.08")


@dataclass
class _Plan:
    """What the pipeline will do, settled before any weight is read."""

    source: str
    nsamples: int
    seqlen: int
    data: tuple[str, ...]
    eval_seqlen: int
    max_windows: int | None


def _plan(cfg: PipelineConfig) -> _Plan:
    """Every check that needs no weights: options, the model's config.json (context), data defaults."""
    from owlctl.engine.evaluation.defaults import eval_defaults
    from owlctl.engine.models import BUILTIN_MODEL, model_config
    from owlctl.ops.checks import check_owl_knobs, check_seqlen, context_length
    from owlctl.ops.common import calib_defaults
    from owlctl.options import Bos, Method, Split, check_choice, check_compute

    check_choice("--method", cfg.method, Method)
    check_choice("--eval-split", cfg.eval_split, Split)
    check_choice("--bos", cfg.bos, Bos)
    check_compute(cfg)
    check_owl_knobs(cfg.outlier_m, cfg.lam)
    if not (isinstance(cfg.target_sparsity, (int, float)) and 0.0 < cfg.target_sparsity < 1.0):
        raise InputError(f"--target-sparsity must be in (0, 1), got {cfg.target_sparsity}")
    if cfg.save_checkpoints and cfg.output is None:
        raise InputError("--save-checkpoints needs --output DIR to save them into")
    config, _ = model_config(cfg.model)
    # On the built-in model the defaults are sized for a 2-core CPU (the whole job in a few minutes).
    small = BUILTIN_PIPELINE if cfg.model == BUILTIN_MODEL else {}
    context = context_length(config)
    source, nsamples, seqlen = calib_defaults(cfg.model, cfg.calib, cfg.nsamples or small.get("nsamples"),
                                              cfg.seqlen or small.get("seqlen"), context)
    data, eval_seqlen = eval_defaults(cfg.model, [cfg.eval_data] if cfg.eval_data else None, cfg.eval_seqlen,
                                      context)
    check_seqlen(seqlen, config, cfg.model)
    check_seqlen(eval_seqlen, config, cfg.model, "--eval-seqlen")
    return _Plan(source, nsamples, seqlen, data, eval_seqlen, cfg.max_windows or small.get("max_windows"))


def pipeline(cfg: PipelineConfig, progress: Any = None, log: Any = None) -> dict:
    """Run the comparison; with ``output`` set, everything is written into a temporary directory beside it
    and renamed into place at the end, so an interrupted run leaves nothing behind."""
    from owlctl.engine.distributed import launched
    from owlctl.ops.checks import model_inputs
    from owlctl.ops.common import hub_of, output_claim

    if launched() is not None:
        raise InputError("pipeline runs in one process; under a launcher (torchrun, accelerate launch) every "
                         "process would write the same folder",
                         hint="launch its steps one by one: torchrun --nproc-per-node N -m owlctl profile / prune "
                              "/ eval ...")
    plan = _plan(cfg)
    with hub_of(cfg), output_claim(cfg.output, cfg.force, "dir", inputs=model_inputs(cfg.model)) as claim:
        doc, files = _run(cfg, plan, progress, log or (lambda _m: None), claim)
        if claim is not None:
            from owlctl.formats._io import dumps
            from owlctl.formats.documents import validate
            from owlctl.formats.kinds import parse_schema

            for name, d in files.items():
                (claim.tmp / name).write_text(dumps(validate(parse_schema(d["schema"])[0], d)), encoding="utf-8")
            claim.commit()
    return doc


def _run(cfg: PipelineConfig, plan: _Plan, progress: Any, say: Any, claim: Any) -> tuple[dict, dict]:
    from owlctl.engine.allocation import allocation_from_profile, uniform_allocation
    from owlctl.engine.calibration.profile import profile_model
    from owlctl.engine.data import calibration
    from owlctl.engine.evaluation.texts import check_calibration_overlap, token_streams
    from owlctl.engine.models import load_tokenizer, local_dir, open_model, resolve_device
    from owlctl.formats._io import header
    from owlctl.ops.common import peak_rss_mb, resolve_bos

    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    tok = load_tokenizer(local_dir(cfg.model)[0])
    bos = resolve_bos(tok, cfg.bos)
    streams = token_streams(plan.data, cfg.eval_split, tok, bos)  # bad data fails before the weights are read
    calib = calibration(plan.source, tok, plan.nsamples, plan.seqlen, cfg.seed, bos=bos, bos_requested=cfg.bos)
    overlap = check_calibration_overlap([calib.as_dict()], plan.data, cfg.eval_split)
    base, tok, info = open_model(cfg.model, cfg.dtype, cfg.offload)
    layout = base.layout
    seconds["load"] = round(time.perf_counter() - t_start, 2)
    t0 = time.perf_counter()
    say(f"profiling ({plan.nsamples} x {plan.seqlen} tokens of {plan.source})")
    prof, _ = profile_model(base, tok, info, calib, outlier_m=tuple(sorted({3.0, 5.0, 7.0, float(cfg.outlier_m)})),
                            device=device, batch_size=cfg.batch_size, progress=progress, command="pipeline",
                            activations=cfg.offload_activations)
    seconds["profile"] = round(time.perf_counter() - t0, 2)
    model_dict = info.as_dict(layout.family.name, layout.num_blocks)
    allocs = {
        "uniform": uniform_allocation(model_dict, [b["name"] for b in prof["blocks"]],
                                      [b["numel"] for b in prof["blocks"]], target_sparsity=cfg.target_sparsity,
                                      command="pipeline"),
        "owl": allocation_from_profile(prof, None, None, target_sparsity=cfg.target_sparsity,
                                       outlier_m=cfg.outlier_m, lam=cfg.lam, command="pipeline"),
    }
    ctx = _Context(cfg, plan, tok, info, model_dict, calib, streams, bos, device, progress, say, seconds, claim)
    rows = [ctx.evaluate(base, "dense", None)]
    checkpoints: dict[str, str] = {}
    for label, alloc in allocs.items():
        rows.append(ctx.prune_and_evaluate(base, label, alloc, checkpoints))
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    doc = {**header("pipeline", "pipeline", model_dict, seconds), "method": cfg.method,
           "target_sparsity": cfg.target_sparsity, "outlier_m": cfg.outlier_m, "lambda": cfg.lam,
           "calibration": calib.as_dict(),
           "evaluation": {"data": list(plan.data), "split": cfg.eval_split, "seqlen": plan.eval_seqlen,
                          "max_windows": plan.max_windows, "bos": bos, "bos_requested": cfg.bos,
                          "calibration_overlap": overlap},
           "results": rows, "owl_block_sparsity": [b["sparsity"] for b in allocs["owl"]["blocks"]],
           "outlier_pct": [b["outlier_pct"] for b in allocs["owl"]["blocks"]],
           "checkpoints": checkpoints, "peak_rss_mb": round(peak_rss_mb(), 1),
           "full_size_hint": FULL_SIZE_HINT}
    files = {"profile.json": prof, **{f"allocation-{k}.json": a for k, a in allocs.items()}, "pipeline.json": doc}
    return doc, files


@dataclass
class _Context:
    """What each variant's pruning and evaluation share."""

    cfg: PipelineConfig
    plan: _Plan
    tok: Any
    info: Any
    model_dict: dict
    calib: Any
    streams: dict
    bos: str
    device: str
    progress: Any
    say: Any
    seconds: dict
    claim: Any

    def evaluate(self, host: Any, label: str, blocks: list[dict] | None) -> dict:
        from owlctl.engine.evaluation.loaded import evaluate_host

        t = time.perf_counter()
        p = self.plan
        self.say(f"evaluating {label} on {', '.join(p.data)} ({self.cfg.eval_split} split, seqlen {p.eval_seqlen})")
        res = evaluate_host(host, self.tok, data=p.data, split=self.cfg.eval_split, seqlen=p.eval_seqlen,
                            batch_size=self.cfg.batch_size, max_windows=p.max_windows, device=self.device,
                            streams=self.streams, progress=self.progress, bos=self.bos,
                            activations=self.cfg.offload_activations)
        self.seconds[f"eval_{label}"] = round(time.perf_counter() - t, 2)
        ppl = res["perplexity"]
        sp = [b["realised_sparsity"] for b in blocks] if blocks else [0.0]
        total = sum(b["numel"] for b in blocks) if blocks else 1
        return {"variant": "dense" if blocks is None else f"{self.cfg.method} {label}",
                "perplexity": ppl,
                "realised_sparsity": sum(b["zeros"] for b in blocks) / total if blocks else 0.0,
                "preexisting_sparsity": sum(b["preexisting_zeros"] for b in blocks) / total if blocks else None,
                "block_sparsity_min": min(sp), "block_sparsity_max": max(sp),
                "prune_seconds": self.seconds.get(f"prune_{label}", 0.0)}

    def prune_and_evaluate(self, base: Any, label: str, alloc: dict, checkpoints: dict) -> dict:
        self.say(f"pruning with {self.cfg.method}, {label} allocation, target {self.cfg.target_sparsity:.0%}")
        name = f"{self.cfg.method}-{label}"
        keep = self.claim is not None and self.cfg.save_checkpoints
        if base.streamed:
            row = self._streamed_variant(base, label, alloc, name, keep)
        else:
            row = self._in_memory_variant(base, label, alloc, name, keep)
        if keep:
            checkpoints[label] = str(Path(self.cfg.output) / name)
        return row

    def _report(self, alloc: dict, blocks: list[dict]) -> dict:
        from owlctl.formats.checkpoint import report_doc

        report = report_doc(self.model_dict, self.cfg.method, alloc["pattern"], blocks, {}, command="pipeline")
        report["calibration"] = self.calib.as_dict()  # so `owlctl eval` can refuse overlapping text
        return report

    def _in_memory_variant(self, base: Any, label: str, alloc: dict, name: str, keep: bool) -> dict:
        from owlctl.core.methods import MethodOptions
        from owlctl.engine.calibration.prune import prune_model
        from owlctl.engine.models.hosts import InMemory

        host = InMemory(copy.deepcopy(base.model))
        t0 = time.perf_counter()
        blocks, _ = prune_model(host, alloc, self.cfg.method, MethodOptions(), self.calib, device=self.device,
                                batch_size=self.cfg.batch_size, progress=self.progress,
                                activations=self.cfg.offload_activations)
        self.seconds[f"prune_{label}"] = round(time.perf_counter() - t0, 2)
        row = self.evaluate(host, label, blocks)
        if keep:
            from owlctl.formats.checkpoint import save_checkpoint

            save_checkpoint(host.model, self.tok, self.claim.tmp / name, force=False, allocation=alloc,
                            report=self._report(alloc, blocks), source_dir=Path(self.info.path),
                            source={"id": self.info.id, "content_sha256": self.info.content_sha256,
                                    "method": self.cfg.method})
        return row

    def _streamed_variant(self, base: Any, label: str, alloc: dict, name: str, keep: bool) -> dict:
        """Prune into a checkpoint (kept in the output folder, or a temporary one), then evaluate it streamed."""
        import shutil
        import tempfile

        from owlctl.core.methods import MethodOptions
        from owlctl.engine.calibration.prune import prune_model
        from owlctl.engine.calibration.to_disk import block_saver, finish_checkpoint, weights_writer
        from owlctl.engine.models.hosts import Streamed

        where = self.claim.tmp / name if keep else Path(tempfile.mkdtemp(prefix=f"owlctl-{name}-"))
        where.mkdir(parents=True, exist_ok=True)
        try:
            writer = weights_writer(where, base, self.info, alloc)
            t0 = time.perf_counter()
            blocks, _ = prune_model(base, alloc, self.cfg.method, MethodOptions(), self.calib, device=self.device,
                                    batch_size=self.cfg.batch_size, progress=self.progress,
                                    after=block_saver(writer, base), activations=self.cfg.offload_activations)
            self.seconds[f"prune_{label}"] = round(time.perf_counter() - t0, 2)
            finish_checkpoint(writer, where, base, self.tok, self.info, alloc, self._report(alloc, blocks),
                              self.cfg.method)
            pruned = Streamed(where, base.dtype)
            try:
                return self.evaluate(pruned, label, blocks)
            finally:
                pruned.close()
        finally:
            if not keep:
                shutil.rmtree(where, ignore_errors=True)
