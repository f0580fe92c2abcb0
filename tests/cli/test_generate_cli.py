"""`owlctl generate`: only the text on stdout (flushed piece by piece), one valid document with --json, the
summary on stderr, and bad input rows (exit 1 with a hint, exit 2 for usage, no traceback)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app
from owlctl.formats.documents import validate

runner = CliRunner()


@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    return pruned_tiny(0.7)


def _gen(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_stdout_is_the_text_and_json_has_text_and_timings(pruned):
    plain = _gen(pruned, "--prompt", "Note 3:", "-n", "12", "--raw", "--threads", "1", "--backend", "torch-sparse")
    assert plain.exit_code == 0, plain.stderr
    js = _gen(pruned, "--prompt", "Note 3:", "-n", "12", "--raw", "--threads", "1", "--backend", "torch-sparse",
              "--json")
    assert js.exit_code == 0, js.stderr
    doc = json.loads(js.stdout)
    validate("generate", doc)
    assert doc["schema"] == "owlctl.generate/1"
    assert plain.stdout == doc["text"] + "\n"  # greedy: the same text, and nothing else on stdout
    assert doc["backend"] == "torch-sparse" and doc["kernel"] == "bitmask" and doc["threads"] == 1
    assert doc["sparse"]["swapped"] > 0 and doc["sampling"]["mode"] == "greedy"
    assert doc["prompt"] == {"text": "Note 3:", "tokens": 7, "chat_template": False}
    t = doc["timings"]
    assert t["prefill_s"] > 0 and t["prefill_tokens"] == 7 and t["decode_tokens_per_s"] > 0
    assert doc["generated_tokens"] == len(doc["token_ids"]) <= 12
    assert (doc["stop"] == "max_new_tokens") == (doc["generated_tokens"] == 12)
    assert t["decode_steps"] == doc["generated_tokens"] - (1 if doc["stop"] == "max_new_tokens" else 0)
    assert "tokens" in plain.stderr and "tok/s" in plain.stderr and "tok/s" not in plain.stdout
    dense = json.loads(_gen(pruned, "-p", "Note 3:", "-n", "12", "--raw", "--threads", "1", "--json").stdout)
    assert dense["token_ids"] == doc["token_ids"] and dense["backend"] == "torch" and dense["kernel"] is None


def test_quiet_leaves_stderr_empty_and_sampling_is_seeded(pruned):
    a = _gen(pruned, "-p", "Note", "-n", "8", "--temperature", "1.0", "--seed", "5", "-q", "--json")
    b = _gen(pruned, "-p", "Note", "-n", "8", "--temperature", "1.0", "--seed", "5", "-q", "--json")
    assert a.exit_code == 0 and a.stderr == ""
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    assert da["token_ids"] == db["token_ids"] and da["sampling"] == {"temperature": 1.0, "top_p": 1.0, "seed": 5,
                                                                      "mode": "sample"}


def test_each_piece_is_written_and_flushed_at_once(monkeypatch):
    """The CLI's streamer: every piece reaches the real stdout (write + flush) before the next is produced."""
    import sys

    from owlctl.cli import generate as cli_generate

    events: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            events.append("w:" + s)

        def flush(self) -> None:
            events.append("flush")

    monkeypatch.setattr(sys, "stdout", Out())
    for piece in ("Hé", "llo", " 🦉"):
        cli_generate._write(piece)
    assert events == ["w:Hé", "flush", "w:llo", "flush", "w: 🦉", "flush"]


def _no_compiler(monkeypatch, tmp_path):
    from owlctl.deploy.kernels import build

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("OWLCTL_CACHE", str(tmp_path / "cache"))
    saved = build._lib
    build.reset_for_tests()
    return lambda: setattr(build, "_lib", saved)


def test_torch_sparse_without_a_compiler_falls_back_and_says_so(pruned, monkeypatch, tmp_path):
    restore = _no_compiler(monkeypatch, tmp_path)
    try:
        r = _gen(pruned, "-p", "Note", "-n", "4", "--backend", "torch-sparse", "--json")
        forced = _gen(pruned, "-p", "Note", "-n", "4", "--backend", "torch-sparse", "--sparse-kernel", "bitmask")
    finally:
        restore()
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["kernel"] == "torch-csr"
    assert "C compiler" in r.stderr and "torch-csr" in r.stderr and "Traceback" not in r.stderr
    assert forced.exit_code == 1 and "C compiler" in forced.stderr and "hint:" in forced.stderr
    assert forced.stdout == ""


BAD = [
    ("missing model dir", lambda p: ["/nonexistent/owlctl-model", "-p", "hi"], 1, "no model directory"),
    ("relative missing dir", lambda p: ["./no-such-model", "-p", "hi"], 1, "no model directory"),
    ("empty prompt", lambda p: [p, "-p", ""], 1, "--prompt is empty"),
    ("blank prompt", lambda p: [p, "-p", "   "], 1, "--prompt is empty"),
    ("no prompt", lambda p: [p], 2, "--prompt"),
    ("max-new-tokens 0", lambda p: [p, "-p", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("max-new-tokens negative", lambda p: [p, "-p", "hi", "-n", "-3"], 2, "--max-new-tokens"),
    ("unknown backend", lambda p: [p, "-p", "hi", "--backend", "onnxruntime"], 2, "--backend"),
    ("negative temperature", lambda p: [p, "-p", "hi", "--temperature", "-1"], 2, "--temperature"),
    ("top-p 0", lambda p: [p, "-p", "hi", "--temperature", "1", "--top-p", "0"], 1, "--top-p"),
    ("threads 0", lambda p: [p, "-p", "hi", "--threads", "0"], 2, "--threads"),
]


@pytest.mark.parametrize("name,args,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input(pruned, name, args, code, needle):
    r = _gen(*args(pruned))
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    if code == 1:
        assert "hint:" in r.stderr or name == "top-p 0"


def test_text_reaches_a_pipe_before_the_process_ends(pruned, tmp_path):
    """Off a terminal too: the first text is readable from the pipe while decoding still runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OWLCTL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "owlctl", "generate", str(pruned), "-p", "Note 7:", "--raw",
                             "-n", "450", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    first = os.read(proc.stdout.fileno(), 1)
    still_running = proc.poll() is None
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    assert first and rest and still_running  # 450 tokens take far longer than reading the first byte
