"""Committed shell completions and docs/cli.md must match what the CLI generates now."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_completions_and_cli_docs_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_bash_completion_completes_commands():
    import os

    env = {**os.environ, "_OWLCTL_COMPLETE": "complete_bash", "COMP_WORDS": "owlctl pr", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-m", "owlctl"], capture_output=True, text=True, env=env)
    words = set(r.stdout.split())
    assert {"prune", "profile"} <= words


def _complete(shell: str, line: str) -> list[str]:
    import os

    env = {**os.environ, "_OWLCTL_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        words = line.split(" ")
        env.update(COMP_WORDS=line, COMP_CWORD=str(len(words) - 1))
    else:
        env.update(_TYPER_COMPLETE_ARGS=line, _TYPER_COMPLETE_FISH_ACTION="get-args")
    r = subprocess.run([sys.executable, "-m", "owlctl"], capture_output=True, text=True, env=env)
    return r.stdout.replace("\\\\:", ":").replace('"', " ").replace("(", " ").replace(")", " ").replace("'", " ").split()


ENUMERATED = [
    ("prune m --method ", {"magnitude", "wanda", "sparsegpt"}),
    ("prune m --balance ", {"blocks", "params"}),
    ("prune m --clamp ", {"redistribute", "reference", "none"}),
    ("allocate p --allocator ", {"owl", "uniform"}),
    ("export m --format ", {"onnx", "packed"}),
    ("bench m --backend ", {"torch", "torch-sparse", "onnxruntime", "deepsparse"}),
    ("bench m --sparse-kernel ", {"auto", "bitmask", "torch-csr"}),
    ("profile m --device cu", {"cuda", "cuda:0"}),
    ("eval m --split ", {"test", "validation"}),
    ("finetune c --keep-sparsity ", {"merge-mask", "masked-lora"}),
]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
@pytest.mark.parametrize("line, want", ENUMERATED, ids=[e[0].split(" ")[2] for e in ENUMERATED])
def test_enumerated_options_complete_in_every_shell(shell, line, want):
    got = set(_complete(shell, "owlctl " + line))
    assert want <= got, (shell, line, got)


def test_zsh_completion_starts_with_compdef():
    assert (ROOT / "completions" / "_owlctl").read_text().splitlines()[0] == "#compdef owlctl"


@pytest.mark.parametrize("cmd", [[], ["prune"], ["allocate"], ["bench"]])
def test_short_help(cmd):
    r = subprocess.run([sys.executable, "-m", "owlctl", *cmd, "-h"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("Usage: owlctl")


def test_every_enumerated_option_lists_its_choices_in_help():
    r = subprocess.run([sys.executable, "-m", "owlctl", "prune", "--help"], capture_output=True, text=True,
                       env={**__import__("os").environ, "COLUMNS": "200"})
    assert "<magnitude|wanda|sparsegpt>" in r.stdout and "<blocks|params>" in r.stdout
