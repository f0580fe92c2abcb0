import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import TEXT, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """factory: model_type -> path of a saved tiny random model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(model_type: str = "llama") -> Path:
        if model_type not in cache:
            cache[model_type] = make_tiny_model(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"))
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def tiny_llama_bos(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer adds BOS to every text (as Gemma's and LLaMA-2's do)."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-bos"), add_bos=True)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def pruned_tiny(tiny_llama, text_file, tmp_path_factory):
    """factory: sparsity -> a fresh copy of a tiny llama pruned by uniform Wanda (pruned once per sparsity)."""
    import shutil

    from owlctl.ops.prune import PruneConfig, prune

    built: dict[float, Path] = {}

    def get(sparsity: float) -> Path:
        if sparsity not in built:
            out = tmp_path_factory.mktemp(f"pruned-{sparsity}") / "ck"
            prune(PruneConfig(model=str(tiny_llama), output=out, method="wanda", uniform=True,
                              target_sparsity=sparsity, calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
            built[sparsity] = out
        copy = tmp_path_factory.mktemp("ck-copy") / "ck"
        shutil.copytree(built[sparsity], copy)
        return copy

    return get
