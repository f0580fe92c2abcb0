"""Bad input on purpose, one row per case: the exit code (1 for a known failure, 2 for a usage error), a
message and a hint on stderr, no traceback, and the output's parent directory exactly as it was before
(hidden temporary and lock names included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from owlctl.cli.main import app

runner = CliRunner()


def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.is_dir() else []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, ro: bool = False):
    """A small tmpfs at ``path`` (root only): a real full or read-only disk, not a simulated one."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Case:
    """args(ctx) -> CLI args; output(ctx) -> the -o path whose parent must stay unchanged."""

    def __init__(self, name: str, args: Callable, code: int, needle: str, hint: str | None = "hint:",
                 setup: Callable | None = None, output: Callable | None = None) -> None:
        self.name, self.args, self.code, self.needle, self.hint = name, args, code, needle, hint
        self.setup, self.output = setup, output

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(scope="module")
def profile_json(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    r = runner.invoke(app, ["profile", str(tiny_llama), "-o", str(out), "--calib", str(text_file), "--nsamples",
                            "2", "--seqlen", "16", "--device", "cpu", "--outlier-m", "3,5"])
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture
def ctx(tiny_llama, text_file, pruned_tiny, profile_json, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return {"tiny": tiny_llama, "text": text_file, "pruned": pruned_tiny(0.5), "profile": profile_json,
            "tmp": tmp_path, "work": work, "out": work / "out"}


def _calib(c) -> list:
    return ["--calib", c["text"], "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]


def _truncate_weights(c) -> None:
    bad = c["tmp"] / "truncated"
    shutil.copytree(c["tiny"], bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    c["bad_model"] = bad


def _binary_calib(c) -> None:
    p = c["tmp"] / "weights.txt"
    p.write_bytes(bytes(range(256)) * 64)
    c["bad_text"] = p


def _latin1_calib(c) -> None:
    p = c["tmp"] / "latin1.txt"
    p.write_bytes(("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. " * 400).encode("latin-1"))
    c["bad_text"] = p


def _dir_at_output(c) -> None:
    (c["work"] / "adir").mkdir()


def _file_at_output(c) -> None:
    (c["work"] / "ck").write_text("not a directory")


def _edit_packed_dtype(c) -> None:
    r = runner.invoke(app, ["export", str(c["pruned"]), "--format", "packed", "-o", str(c["tmp"] / "packed")])
    assert r.exit_code == 0, r.stderr
    head = json.loads((c["tmp"] / "packed" / "packed.json").read_text())
    head["tensors"][0]["dtype"] = "__class__"
    (c["tmp"] / "packed" / "packed.json").write_text(json.dumps(head))


def _profile_without_blocks(c) -> None:
    doc = json.loads(Path(c["profile"]).read_text())
    del doc["model"]["num_blocks"]
    p = c["tmp"] / "no-blocks.json"
    p.write_text(json.dumps(doc))
    c["edited_profile"] = p


def _copy_of_input(c) -> None:
    c["own"] = c["work"] / "model"
    shutil.copytree(c["tiny"], c["own"])


def _busy_lock(c) -> None:
    (c["work"] / ".ck.owlctl-lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live owner


CASES = [
    # tracebacks that became messages
    Case("truncated safetensors", lambda c: ["prune", c["bad_model"], "--method", "magnitude", "--uniform", "-s",
                                              "0.5", "-o", c["out"]], 1, "cannot be read", setup=_truncate_weights),
    Case("binary calib file", lambda c: ["prune", c["tiny"], "--uniform", "-s", "0.5", "-o", c["out"], "--calib",
                                         c["bad_text"], "--device", "cpu"], 1, "binary", setup=_binary_calib),
    Case("latin-1 calib file", lambda c: ["profile", c["tiny"], "-o", c["work"] / "p.json", "--calib", c["bad_text"],
                                          "--device", "cpu"], 1, "not UTF-8", setup=_latin1_calib,
         output=lambda c: c["work"] / "p.json"),
    Case("latin-1 eval data", lambda c: ["eval", c["pruned"], "--data", c["bad_text"], "--seqlen", "16",
                                         "--device", "cpu"], 1, "not UTF-8", setup=_latin1_calib, output=lambda c: None),
    Case("allocate -o DIR --force", lambda c: ["allocate", c["profile"], "-s", "0.5", "-m", "5", "-o",
                                               c["work"] / "adir", "--force"], 1, "is a directory",
         setup=_dir_at_output, output=lambda c: c["work"] / "adir"),
    Case("packed dtype edited", lambda c: ["eval", c["tmp"] / "packed", "--data", c["text"], "--seqlen", "16",
                                           "--device", "cpu"], 1, "not one owlctl writes", setup=_edit_packed_dtype,
         output=lambda c: None),
    # silently wrong before
    Case("nm --pattern 0:4", lambda c: ["nm", c["tiny"], "--pattern", "0:4", "-o", c["out"], *_calib(c)], 1,
         "keeps no weight"),
    Case("prune --force onto its input", lambda c: ["prune", c["own"], "--method", "magnitude", "--uniform", "-s",
                                                    "0.5", "-o", c["own"], "--force"], 1, "delete the input",
         setup=_copy_of_input, output=lambda c: c["own"]),
    Case("export --force onto its input", lambda c: ["export", c["own"], "--format", "packed", "-o", c["own"],
                                                     "--force"], 1, "delete the input", setup=_copy_of_input,
         output=lambda c: c["own"]),
    Case("a file at -o", lambda c: ["prune", c["tiny"], "--method", "magnitude", "--uniform", "-s", "0.5", "-o",
                                    c["work"] / "ck", "--force"], 1, "is a file", setup=_file_at_output,
         output=lambda c: c["work"] / "ck"),
    # races
    Case("a second prune to the same -o", lambda c: ["prune", c["tiny"], "--method", "magnitude", "--uniform", "-s",
                                                     "0.5", "-o", c["work"] / "ck"], 1, "another owlctl process",
         setup=_busy_lock, output=lambda c: c["work"] / "ck"),
    # wrong hints before
    Case("profile passed as --allocation", lambda c: ["prune", c["tiny"], "--allocation", c["profile"], "-o", c["out"],
                                                      *_calib(c)], 1, "pass it with --from-profile"),
    Case("profile without num_blocks", lambda c: ["prune", c["tiny"], "--from-profile", c["edited_profile"], "-s",
                                                  "0.5", "-o", c["out"], *_calib(c)], 1,
         "model.num_blocks is missing", setup=_profile_without_blocks),
    Case("directory as profile", lambda c: ["allocate", c["work"], "-s", "0.5"], 1, "is a directory",
         output=lambda c: None),
    # cheap checks (before any weight is read)
    Case("M does not divide the widths", lambda c: ["nm", c["tiny"], "--pattern", "2:5", "-o", c["out"], *_calib(c)],
         1, "M=5 needs M to divide"),
    Case("outlier M is NaN", lambda c: ["prune", c["tiny"], "--from-profile", c["profile"], "-s", "0.5", "-m", "nan",
                                        "-o", c["out"], *_calib(c)], 1, "--outlier-m must be a finite number"),
    Case("negative lambda", lambda c: ["allocate", c["profile"], "-s", "0.5", "-m", "5", "-l", "-1"], 1,
         "--lambda", output=lambda c: None),
    Case("M not profiled", lambda c: ["prune", c["tiny"], "--from-profile", c["profile"], "-s", "0.5", "-m", "7",
                                      "-o", c["out"], *_calib(c)], 1, "M = 7 was not profiled"),
    Case("seqlen beyond the context", lambda c: ["prune", c["tiny"], "--uniform", "-s", "0.5", "-o", c["out"],
                                                 "--calib", c["text"], "--seqlen", "1024", "--device", "cpu"], 1,
         "longer than the 512 positions"),
    Case("profile seqlen beyond the context", lambda c: ["profile", c["tiny"], "-o", c["work"] / "p.json", "--calib",
                                                         c["text"], "--seqlen", "1024"], 1,
         "longer than the 512 positions", output=lambda c: c["work"] / "p.json"),
    # usage errors (exit 2, from the one declaration of each option)
    Case("--nsamples 0", lambda c: ["profile", c["tiny"], "--nsamples", "0"], 2, "--nsamples", hint=None,
         output=lambda c: None),
    Case("--seqlen 0", lambda c: ["prune", c["tiny"], "--uniform", "-s", "0.5", "-o", c["out"], "--seqlen", "0"], 2,
         "--seqlen", hint=None),
    Case("unknown --method", lambda c: ["prune", c["tiny"], "--method", "obc", "--uniform", "-s", "0.5", "-o",
                                        c["out"]], 2, "'obc' is not one of", hint=None),
    Case("unknown --balance", lambda c: ["allocate", c["profile"], "-s", "0.5", "--balance", "layers"], 2,
         "--balance", hint=None, output=lambda c: None),
    Case("unknown --clamp", lambda c: ["prune", c["tiny"], "--uniform", "-s", "0.5", "-o", c["out"], "--clamp",
                                       "soft"], 2, "--clamp", hint=None),
    Case("unknown --format", lambda c: ["export", c["pruned"], "--format", "gguf", "-o", c["out"]], 2, "--format",
         hint=None),
    Case("unknown --backend", lambda c: ["bench", c["pruned"], "--backend", "tensorrt"], 2, "--backend", hint=None,
         output=lambda c: None),
    Case("unknown --sparse-kernel", lambda c: ["bench", c["pruned"], "--backend", "torch-sparse", "--sparse-kernel",
                                               "magic"], 2, "--sparse-kernel", hint=None, output=lambda c: None),
    Case("unknown --device", lambda c: ["prune", c["tiny"], "--uniform", "-s", "0.5", "-o", c["out"], "--device",
                                        "gpu"], 2, "unknown device 'gpu'", hint=None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ctx):
    if case.setup:
        case.setup(ctx)
    out = case.output(ctx) if case.output else ctx["out"]
    parent = (out.parent if out is not None else ctx["work"])
    before = _listing(parent)
    before_files = {n: (parent / n).read_bytes() for n in before if (parent / n).is_file()}
    r = runner.invoke(app, [str(a) for a in case.args(ctx)])
    assert r.exit_code == case.code, (r.exit_code, r.stderr)
    assert case.needle in r.stderr, r.stderr
    if case.hint:
        assert case.hint in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _listing(parent) == before, "the output's parent directory changed"
    assert {n: (parent / n).read_bytes() for n in before_files} == before_files


def test_read_only_output_fails_before_any_work(ctx):
    ro = ctx["tmp"] / "ro"
    with _tmpfs(ro, "1m", ro=True):
        r = runner.invoke(app, ["prune", str(ctx["tiny"]), "--uniform", "-s", "0.5", "-o", str(ro / "ck"),
                                *map(str, _calib(ctx))])
        assert r.exit_code == 1, r.stderr
        assert "Read-only file system" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
        assert "loading" not in r.stderr  # refused before the weights were read
        assert _listing(ro) == []


@pytest.mark.parametrize("size", ["64k", "600k"])
def test_full_disk(ctx, size):
    """64k: refused before the work (the weights alone do not fit); 600k: the weights fit but the whole
    checkpoint does not, so the save itself hits ENOSPC: a message, and nothing left on the disk."""
    full = ctx["tmp"] / "full"
    with _tmpfs(full, size):
        r = runner.invoke(app, ["prune", str(ctx["tiny"]), "--method", "magnitude", "--uniform", "-s", "0.5", "-o",
                                str(full / "ck")])
        assert r.exit_code == 1, r.stderr
        assert ("MiB free" in r.stderr or "No space left" in r.stderr) and "hint:" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert _listing(full) == []


def test_stale_partial_of_a_killed_run_is_removed(ctx):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = ctx["work"] / f".ck.partial-{dead}-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a checkpoint")
    (ctx["work"] / ".ck.owlctl-lock").write_text(f"{dead} {os.uname().nodename}\n")
    r = runner.invoke(app, ["prune", str(ctx["tiny"]), "--method", "magnitude", "--uniform", "-s", "0.5", "-o",
                            str(ctx["work"] / "ck")])
    assert r.exit_code == 0, r.stderr
    assert "removed 1 stale partial output" in r.stderr
    assert _listing(ctx["work"]) == ["ck"]


def test_a_partial_of_a_live_process_is_kept(ctx):
    live = ctx["work"] / f".ck.partial-{os.getppid()}-x1y2"
    live.mkdir()
    r = runner.invoke(app, ["prune", str(ctx["tiny"]), "--method", "magnitude", "--uniform", "-s", "0.5", "-o",
                            str(ctx["work"] / "ck")])
    assert r.exit_code == 0, r.stderr
    assert live.is_dir()


def test_builtin_conversion_never_deletes_a_complete_model(tmp_path):
    from owlctl.engine.models.builtins import _publish

    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"theirs")
    mine = tmp_path / "models" / ".m.partial-1-a"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_bytes(b"mine")
    _publish(mine, out)  # another process finished first: keep theirs (a reader may hold it open)
    assert (out / "model.safetensors").read_bytes() == b"theirs"
    (out / "model.safetensors").unlink()  # an incomplete leftover is replaced
    mine.mkdir(exist_ok=True)
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_bytes(b"mine")
    _publish(mine, out)
    assert (out / "model.safetensors").read_bytes() == b"mine"
