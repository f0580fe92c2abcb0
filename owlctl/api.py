"""The in-memory API, for users who already hold a model (the convention of llm-compressor's ``oneshot``):

    import owlctl
    report = owlctl.prune_model(model, tokenizer, method="wanda", target_sparsity=0.7, allocator="owl")

``model`` is a transformers CausalLM of a registered family (or one the generic walk finds), pruned in place;
the return value is the owlctl.report document (realised sparsity per block and matrix). The file-based
verbs (``owlctl.prune(PruneConfig(...))`` etc.) read and write checkpoints; these functions never touch disk
except for the token cache.
"""

from __future__ import annotations

from typing import Any

from owlctl.engine.models.hosts import InMemory


def _info(model: Any) -> Any:
    from owlctl.engine.models import ModelInfo

    name = str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "in-memory")
    return ModelInfo(id=name, model_type=model.config.model_type, revision=None, content_sha256="in-memory",
                     path="", spec=name)


def _calibration(tokenizer: Any, calib: str, nsamples: int, seqlen: int, seed: int, bos: str) -> Any:
    from owlctl.engine.data import calibration, resolve_bos

    resolved = resolve_bos(tokenizer, bos)
    return calibration(calib, tokenizer, nsamples, seqlen, seed, bos=resolved, bos_requested=bos)


def profile_model(model: Any, tokenizer: Any, *, calib: str = "builtin:wiki", nsamples: int = 32,
                  seqlen: int = 512, seed: int = 0, bos: str = "auto", outlier_m: tuple[float, ...] = (3, 5, 7),
                  batch_size: int = 8, device: str = "cpu", progress: Any = None) -> dict:
    """The owlctl.profile document of a model in memory (one dense calibration pass; weights unchanged)."""
    from owlctl.engine.calibration.profile import profile_model as run

    calib_data = _calibration(tokenizer, calib, nsamples, seqlen, seed, bos)
    doc, _ = run(InMemory(model), tokenizer, _info(model), calib_data, outlier_m=tuple(sorted({float(m) for m in outlier_m})),
                 device=device, batch_size=batch_size, progress=progress, command="api")
    return doc


def prune_model(model: Any, tokenizer: Any, *, method: str = "wanda", target_sparsity: float | None = None,
                allocator: str = "uniform", pattern: str | None = None, allocation: dict | None = None,
                profile: dict | None = None, outlier_m: float | None = None, lam: float | None = None,
                calib: str = "builtin:wiki", nsamples: int = 32, seqlen: int = 512, seed: int = 0,
                bos: str = "auto", batch_size: int = 8, device: str = "cpu", progress: Any = None) -> dict:
    """Prune ``model`` in place and return the owlctl.report document.

    The allocation is, in this order: ``allocation`` (an owlctl.allocation document), OWL from ``profile``
    (a profile document; computed on the same calibration data when ``allocator="owl"`` and none is given),
    or uniform at ``target_sparsity`` (or N:M ``pattern``, N weights kept per group of M).
    """
    from owlctl.core.methods import MethodOptions, get
    from owlctl.engine.allocation import allocation_from_profile, uniform_allocation
    from owlctl.engine.calibration.prune import prune_model as run
    from owlctl.families import resolve
    from owlctl.formats.checkpoint import report_doc
    from owlctl.options import Allocator, Method, check_choice

    check_choice("--method", method, Method)
    check_choice("--allocator", allocator, Allocator)
    layout, info = resolve(model), _info(model)
    needs_data = bool(get(method).needs) or (allocation is None and profile is None and allocator == "owl")
    calib_data = _calibration(tokenizer, calib, nsamples, seqlen, seed, bos) if needs_data else None
    if allocation is None and profile is None and allocator == "owl":
        profile = profile_model(model, tokenizer, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
                                outlier_m=(3.0, 5.0, 7.0, outlier_m or 5.0), batch_size=batch_size, device=device)
    if allocation is None and profile is not None:
        allocation = allocation_from_profile(profile, None, None, target_sparsity=target_sparsity,
                                             outlier_m=outlier_m, lam=lam, pattern=pattern, command="api")
    if allocation is None:
        numels = [sum(lin.weight.numel() for lin in layout.linears(i).values()) for i in range(layout.num_blocks)]
        allocation = uniform_allocation(info.as_dict(layout.family.name, layout.num_blocks),
                                        [layout.block_name(i) for i in range(layout.num_blocks)], numels,
                                        target_sparsity=target_sparsity, pattern=pattern, command="api")
    rows, timings = run(InMemory(model, layout), allocation, method, MethodOptions(), calib_data, device=device,
                        batch_size=batch_size, progress=progress)
    report = report_doc(info.as_dict(layout.family.name, layout.num_blocks), method, allocation["pattern"], rows,
                        timings.as_dict(), command="api")
    report["calibration"] = calib_data.as_dict() if calib_data is not None else None
    return report
