"""Committed shell completions and docs/cli.md must match what the CLI generates now."""

import subprocess
import sys
from pathlib import Path

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
