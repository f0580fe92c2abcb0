"""Shared option aliases: the same concept has the same flag in every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Output = Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto (cuda when available).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's) | float32 | float16 | bfloat16.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for calibration sampling.")]
Bos = Annotated[str, typer.Option(
    "--bos", help="BOS per window: auto (when the tokenizer adds one, e.g. Gemma) | always | never (the "
                  "reference: one stream, only its start has BOS).")]
Calib = Annotated[str, typer.Option(
    "--calib", help="Calibration data: builtin:wiki | c4 | wikitext2 | a local .txt/.jsonl file or folder "
                    "(its calibration split; see docs/formats.md).")]
NSamples = Annotated[Optional[int], typer.Option("--nsamples", help="Calibration sequences (default: 128, builtin: 32).")]
SeqLen = Annotated[Optional[int], typer.Option("--seqlen", help="Tokens per calibration sequence (default: 2048, builtin: 512).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
TargetSparsity = Annotated[Optional[float], typer.Option(
    "--target-sparsity", "-s", help="Target global sparsity S: the FRACTION of weights pruned, in [0, 1).")]
OutlierM = Annotated[Optional[float], typer.Option(
    "--outlier-m", "-m", help="Outlier threshold M (the paper's Hyper_m): a score is an outlier if > M x block mean.")]
Lambda = Annotated[Optional[float], typer.Option(
    "--lambda", "-l", help="OWL range lambda (the paper's Lamda): per-block sparsities span 2*lambda.")]
Pattern = Annotated[Optional[str], typer.Option(
    "--pattern", help="N:M with N = weights KEPT per group of M inputs (2:4 = 50%). The reference's '5:8' is 3:8 here.")]
Method = Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt")]
