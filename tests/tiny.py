"""Tiny random models built from config (tens of thousands of parameters) and a byte-level tokenizer,
saved as ordinary Hugging Face directories so every owlctl command can load them offline."""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox")
VOCAB = 260  # 256 bytes + 4 specials
SLIDING = 8  # shorter than the calibration windows the propagation tests use (24 tokens)

# Configs built to exercise what differs between blocks: several layer types (each with its own mask and, for
# Gemma-3, its own rotary theta), sliding windows shorter than the calibration length, tied embeddings.
# name -> (model_type, config overrides). Block 0 is of another type than some later block in each hybrid,
# so replaying block 0's inputs for every block gives those blocks the wrong mask / rotary table.
VARIANTS = {
    "gemma3_text-hybrid": ("gemma3_text", dict(
        num_hidden_layers=4, sliding_window=SLIDING, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    "gemma2-alternating": ("gemma2", dict(sliding_window=SLIDING, tie_word_embeddings=True)),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=SLIDING, max_window_layers=1)),
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=SLIDING, max_window_layers=1)),
    "mistral-sliding": ("mistral", dict(sliding_window=SLIDING)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
}

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes weights that matter least.",
    "Outliers are rare features with very large magnitude, and layers differ in how many they carry.",
    "A sparse model keeps most of its quality when the right weights stay.",
    "Calibration text is read to measure activations and is never scored.",
    "Held-out text measures how well the pruned model still predicts the next token.",
)


def _paragraph(k: int) -> str:
    """Paragraph k of the test corpus: distinct from every other (its number), about 200 characters."""
    picked = [_SENTENCES[(k + j) % len(_SENTENCES)] for j in range(3)]
    return f"Note {k}: " + " ".join(picked)


# 60 distinct paragraphs: every split of the local-file rule (index % 20) is non-empty and disjoint from the
# others (test = paragraphs 0, 20, 40; validation = 1, 21, 41; calibration = the other 54).
PARAGRAPHS = 60
TEXT = "\n\n".join(_paragraph(k) for k in range(PARAGRAPHS)) + "\n"


def byte_tokenizer(add_bos: bool = False):
    """Byte-level tokenizer; ``add_bos``: it prepends <s> to every text by default, like Gemma's or LLaMA-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for j, sp in enumerate(["<unk>", "<s>", "</s>", "<pad>"]):
        vocab[sp] = 256 + j
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if add_bos:
        tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_config(model_type: str, layers: int = 3):
    """The tiny config of a registered model type, or of a VARIANTS name."""
    from transformers import AutoConfig

    overrides: dict = {}
    if model_type in VARIANTS:
        model_type, overrides = VARIANTS[model_type]
        overrides = dict(overrides)
        layers = overrides.pop("num_hidden_layers", layers)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=512, bos_token_id=257,
                  eos_token_id=258, pad_token_id=259, tie_word_embeddings=False)
    common.update({k: overrides.pop(k) for k in list(overrides) if k in common})
    if model_type == "opt":
        return AutoConfig.for_model("opt", hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                    word_embed_proj_dim=64, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    rotary_pct=0.5, **common)
    kw = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if model_type in ("gemma2", "gemma3_text"):
        kw.update(sliding_window=64, query_pre_attn_scalar=16)
    if model_type == "phi3":
        kw.pop("head_dim")
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw, **common)


def make_tiny_model(model_type: str, path: Path, seed: int = 0, layers: int = 3, add_bos: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers))
    with torch.no_grad():  # give some input channels outlier-like scale, as real LLMs have
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(1.0 + 4.0 * (torch.rand(p.shape[1]) > 0.95).float())
    model.eval()
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer(add_bos).save_pretrained(path)
    return path


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold the same tensor names, dtypes and values, bit for bit."""
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
