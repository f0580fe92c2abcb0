"""Signals as batch schedulers send them, on the real built-in model (a 514 MB save takes long enough to be
interrupted in the middle; blocks are written as they are pruned, so the
signal is sent at the first block's progress line, when the partial output exists and most work is ahead): SIGTERM cleans up like Ctrl-C (exit 143), SIGKILL's leftovers are removed by
the next run aimed at the same output, and an interrupted `pipeline --save-checkpoints` leaves nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "owlctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 600) -> list[str]:
    """Read stderr lines until one contains ``needle``; return the lines read."""
    seen = []
    t0 = time.monotonic()
    assert proc.stderr is not None
    while time.monotonic() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"exited before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} in {timeout} s")


PRUNE = ["prune", "builtin:smollm2-135m", "--method", "magnitude", "--uniform", "-s", "0.5", "--device", "cpu"]


def test_sigterm_during_save_leaves_nothing(tmp_path):
    proc = _start(PRUNE + ["-o", str(tmp_path / "ck")])
    _wait_for(proc, "block 1/")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): no partial output was left behind" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    proc = _start(PRUNE + ["-o", str(tmp_path / "ck")])
    _wait_for(proc, "block 1/")
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(os.listdir(tmp_path))
    assert any(n.startswith(".ck.partial-") for n in left), left  # what a SIGKILL leaves
    r = subprocess.run([sys.executable, "-m", "owlctl", *PRUNE, "-o", str(tmp_path / "ck")], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "stale partial output" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_interrupted_pipeline_with_checkpoints_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _start(["pipeline", "--device", "cpu", "--nsamples", "4", "--seqlen", "64", "--max-windows", "2",
                   "-o", str(out), "--save-checkpoints"])
    _wait_for(proc, "owl allocation")  # the uniform checkpoint is already written
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: no partial output was left behind" in err and "kept" not in err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert not Path(out).exists()
