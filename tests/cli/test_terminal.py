"""Every long-running command as a person meets it: in a real pseudo-terminal (progress bars, cursor
hidden and shown again), with TTY_COMPATIBLE=1 (rich draws bars into a file), with TERM=dumb, and off a
terminal with stderr in a file (plain progress lines, nothing on stdout but results).

CliRunner never has a terminal, which is how a crash on every real terminal once went unnoticed; these
tests run `python -m owlctl` in a subprocess on tiny models.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

SHOW_CURSOR, HIDE_CURSOR = b"\x1b[?25h", b"\x1b[?25l"
BAR = "━".encode()  # rich's BarColumn


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "NO_COLOR", "TTY_INTERACTIVE")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OWLCTL_CACHE": str(cache), "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40", **extra})
    return env


def run_in_pty(args: list[str], env: dict, timeout: float = 300) -> tuple[int, bytes]:
    """Run ``python -m owlctl ARGS`` with stdin/stdout/stderr on a new pty; return (exit code, all output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "owlctl", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True, start_new_session=True)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout} s: {args}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), bytes(out)


def run_to_file(args: list[str], env: dict, tmp: Path) -> tuple[int, str, str]:
    """Off a terminal: stdout piped, stderr in a file (nohup, Slurm, `2> log`)."""
    log = tmp / "stderr.log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "owlctl", *args], stdout=subprocess.PIPE, stderr=f, env=env,
                              timeout=600)
    return proc.returncode, proc.stdout.decode(), log.read_text()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("owlctl-cache-pty")


@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    return pruned_tiny(0.5)


def _commands(tiny: Path, text: Path, pruned: Path, out: Path) -> dict[str, list[str]]:
    calib = ["--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    return {
        "profile": ["profile", str(tiny), "-o", str(out / "p.json"), *calib],
        "prune": ["prune", str(tiny), "--method", "wanda", "--uniform", "-s", "0.5", "-o", str(out / "ck"), *calib],
        "nm": ["nm", str(tiny), "--pattern", "2:4", "-o", str(out / "nm"), *calib],
        "eval": ["eval", str(pruned), "--data", str(text), "--seqlen", "32", "--max-windows", "4", "--device", "cpu"],
        "bench": ["bench", str(pruned), "--backend", "torch-sparse", "--prompt-len", "8", "--new-tokens", "2",
                  "--warmup", "0"],
        "pipeline": ["pipeline", str(tiny), *calib, "--eval-data", str(text), "--eval-seqlen", "32",
                     "--max-windows", "2", "-o", str(out / "run")],
        "export": ["export", str(pruned), "--format", "packed", "-o", str(out / "packed")],
        "finetune": ["finetune", str(pruned), "-o", str(out / "ft"), "--data", str(text), "--steps", "2",
                     "--batch-size", "1", "--effective-batch", "1", "--block-size", "32", "--eval-windows", "1",
                     "--device", "cpu"],
    }


COMMANDS = ("profile", "prune", "nm", "eval", "bench", "pipeline", "export", "finetune")


@pytest.mark.parametrize("command", COMMANDS)
def test_progress_bar_on_a_real_terminal(command, tiny_llama, text_file, pruned, cache, tmp_path):
    rc, out = run_in_pty(_commands(tiny_llama, text_file, pruned, tmp_path)[command], _env(cache))
    text = out.decode(errors="replace")
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "lost sys.stderr" not in text
    assert BAR in out, "no progress bar was drawn"
    assert HIDE_CURSOR in out and out.rfind(SHOW_CURSOR) > out.rfind(HIDE_CURSOR), "the cursor is left hidden"


@pytest.mark.parametrize("command", COMMANDS)
def test_tty_compatible_draws_bars_into_a_file(command, tiny_llama, text_file, pruned, cache, tmp_path):
    """TTY_COMPATIBLE=1 makes rich treat a file as a terminal: the same code path as a pty, without one."""
    rc, stdout, stderr = run_to_file(_commands(tiny_llama, text_file, pruned, tmp_path)[command],
                                     _env(cache, TTY_COMPATIBLE="1"), tmp_path)
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert BAR.decode() in stderr and SHOW_CURSOR.decode() in stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_dumb_terminal_gets_plain_lines(command, tiny_llama, text_file, pruned, cache, tmp_path):
    rc, out = run_in_pty(_commands(tiny_llama, text_file, pruned, tmp_path)[command], _env(cache, TERM="dumb"))
    text = out.decode(errors="replace")
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    assert HIDE_CURSOR not in out, "cursor movement on a terminal that cannot do it"


@pytest.mark.parametrize("command", ["profile", "prune", "nm", "eval", "bench", "finetune"])
def test_off_a_terminal_one_plain_line_per_step(command, tiny_llama, text_file, pruned, cache, tmp_path):
    rc, stdout, stderr = run_to_file(_commands(tiny_llama, text_file, pruned, tmp_path)[command], _env(cache),
                                     tmp_path)
    assert rc == 0, stderr[-3000:]
    assert "\r" not in stderr and "\x1b[" not in stderr, "a log file gets no carriage returns or escapes"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    steps = [ln for ln in lines if ln.rstrip().endswith(" s") and "/" in ln]
    assert steps, f"no progress lines in {stderr!r}"
    if command in ("profile", "prune", "nm"):
        assert [ln.split()[-3] for ln in steps if " block " in ln] == ["1/3", "2/3", "3/3"], stderr
        assert any(ln.startswith("loading ") for ln in lines), "the load phase says what it does"
    # -q silences all of it
    rc, stdout_q, stderr_q = run_to_file(_commands(tiny_llama, text_file, pruned, tmp_path / "q")[command]
                                         + ["-q"], _env(cache), tmp_path)
    assert rc == 0 and stderr_q == "", stderr_q
