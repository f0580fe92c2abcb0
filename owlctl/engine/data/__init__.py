"""Text for calibration and evaluation: sources and their disjoint splits (sources), token ids with the BOS
setting and seeded calibration windows (tokens), and fingerprints of calibration text (fingerprint)."""

from owlctl.engine.data.fingerprint import fingerprint_overlap, text_fingerprint
from owlctl.engine.data.sources import (
                                        BUILTIN_WIKI,
                                        CHAR_RULE,
                                        SPLIT_RULE,
                                        SPLITS,
                                        documents,
                                        overlap_texts,
                                        split_info,
                                        wiki_articles,
)
from owlctl.engine.data.tokens import (
                                        Calibration,
                                        bos_warning,
                                        calibration,
                                        resolve_bos,
                                        token_stream,
                                        tokenizer_adds_bos,
)

__all__ = ["BUILTIN_WIKI", "CHAR_RULE", "SPLIT_RULE", "SPLITS", "Calibration", "bos_warning", "calibration",
           "documents", "fingerprint_overlap", "overlap_texts", "resolve_bos", "split_info", "text_fingerprint",
           "token_stream", "tokenizer_adds_bos", "wiki_articles"]
