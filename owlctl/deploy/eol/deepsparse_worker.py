"""DeepSparse worker: run by `owlctl bench --backend deepsparse` with the DeepSparse venv's Python.

DeepSparse 1.8.0 cannot live in owlctl's environment (it needs numpy < 2, onnx < 1.15, Python < 3.12), so
owlctl starts this file as a script in its own venv. It imports only the standard library, numpy and
deepsparse (never owlctl), reads one JSON request on stdin and prints one JSON document on stdout.

Request: {"onnx": path, "inputs": [graph input names], "geometry": {num_layers, kv_heads, head_dim},
          "prompt": [[token ids]] (batch x prompt_len), "new_tokens": n, "runs": r, "warmup": w,
          "threads": t}

DeepSparse compiles a graph for fixed shapes, so the KV-cache graph is compiled twice:
  prefill engine: input_ids (B, L), attention_mask (B, 1 + L), past (B, H, 1, D)  (one masked dummy slot)
  decode engine:  input_ids (B, 1), attention_mask (B, K + 1), past (B, H, K, D), K = L + new_tokens
The decode cache is a fixed buffer filled from the right; empty slots on the left are masked out, and the
graph computes position ids from the mask, so every step sees exactly the tokens generated so far.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time


def _rss_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _private_copy(onnx_path: str, work: str, name: str) -> str:
    """Copy the graph into ``work``; link its neighbours there (external weight files, if any, are found
    relative to the graph and are only read, never rewritten)."""
    src_dir = os.path.dirname(os.path.abspath(onnx_path))
    for entry in os.listdir(src_dir):
        link = os.path.join(work, entry)
        if entry != os.path.basename(onnx_path) and not os.path.exists(link):
            os.symlink(os.path.join(src_dir, entry), link)
    dst = os.path.join(work, name)
    shutil.copyfile(onnx_path, dst)
    return dst


class _Shapes:
    """Batch, prompt and decode-buffer shapes of one request."""

    def __init__(self, req: dict, prompt) -> None:
        geom = req["geometry"]
        self.B, self.L = prompt.shape
        self.n_new = int(req["new_tokens"])
        self.K = self.L + self.n_new  # decode steps feed n_new tokens after the prompt
        self.H, self.D = geom["kv_heads"], geom["head_dim"]
        self.n_kv = 2 * geom["num_layers"]


def _engines(req: dict, sh: _Shapes, threads: int):
    """(prefill engine, decode engine or None, compile seconds of each).

    Engine(..., input_shapes=...) rewrites the ONNX file IN PLACE with the fixed shapes (DeepSparse 1.8.0's
    override_onnx_input_shapes defaults to inplace=True), so each engine compiles a private copy and the
    caller's export stays dynamic."""
    from deepsparse import Engine

    B, L, K, H, D, n_kv = sh.B, sh.L, sh.K, sh.H, sh.D, sh.n_kv
    work = tempfile.mkdtemp(prefix="owlctl-deepsparse-")
    try:
        t = time.perf_counter()
        pre = Engine(_private_copy(req["onnx"], work, "prefill.onnx"), batch_size=B, num_cores=threads,
                     input_shapes=[[B, L], [B, L + 1]] + [[B, H, 1, D]] * n_kv)
        t_pre = time.perf_counter() - t
        dec, t_dec = None, 0.0
        if sh.n_new >= 1:
            t = time.perf_counter()
            dec = Engine(_private_copy(req["onnx"], work, "decode.onnx"), batch_size=B, num_cores=threads,
                         input_shapes=[[B, 1], [B, K + 1]] + [[B, H, K, D]] * n_kv)
            t_dec = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)  # compiled engines no longer read the files
    return pre, dec, t_pre, t_dec


def _generate(pre, dec, prompt, sh: _Shapes):
    """One prefill + greedy decode: (prefill seconds, per-step seconds, the prompt's logits)."""
    import numpy as np

    B, L, K, H, D = sh.B, sh.L, sh.K, sh.H, sh.D
    t0 = time.perf_counter()
    mask = np.ones((B, L + 1), dtype=np.int64)
    mask[:, 0] = 0  # the dummy past slot
    out = pre.run([prompt, mask] + [np.zeros((B, H, 1, D), dtype=np.float32) for _ in range(sh.n_kv)])
    logits, present = out[0], out[1:]
    t_prefill = time.perf_counter() - t0
    # move the prompt's keys/values (without the dummy slot) to the right end of the decode buffer
    cache = []
    for p in present:
        buf = np.zeros((B, H, K, D), dtype=np.float32)
        buf[:, :, K - L:, :] = p[:, :, 1:, :]
        cache.append(buf)
    valid = L
    nxt = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
    steps = []
    for _ in range(sh.n_new):
        mask = np.zeros((B, K + 1), dtype=np.int64)
        mask[:, K - valid:] = 1
        t0 = time.perf_counter()
        out = dec.run([nxt, mask] + cache)
        nxt = out[0][:, -1, :].argmax(-1).astype(np.int64)[:, None]
        cache = [np.ascontiguousarray(p[:, :, 1:, :]) for p in out[1:]]  # drop the oldest (empty) slot
        steps.append(time.perf_counter() - t0)
        valid += 1
    return t_prefill, steps, logits


def main() -> int:
    req = json.loads(sys.stdin.read())
    import numpy as np

    try:
        import deepsparse
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"cannot import deepsparse: {type(e).__name__}: {e}"}))
        return 3
    prompt = np.asarray(req["prompt"], dtype=np.int64)
    sh = _Shapes(req, prompt)
    threads = int(req.get("threads", 1))
    rss0 = _rss_mb("VmRSS")
    _reset_peak()
    pre, dec, t_pre, t_dec = _engines(req, sh, threads)
    for _ in range(int(req.get("warmup", 1))):
        _generate(pre, dec, prompt, sh)
    runs, first = [], None
    for _ in range(int(req["runs"])):
        t_prefill, steps, logits = _generate(pre, dec, prompt, sh)
        first = logits if first is None else first
        runs.append({"prefill_s": t_prefill, "step_s": steps})
    print(json.dumps({
        "deepsparse_version": deepsparse.__version__, "num_cores": threads,
        "bind_threads": os.environ.get("NM_BIND_THREADS_TO_CORES"),
        "compile_seconds": [round(t_pre, 3), round(t_dec, 3)], "runs": runs,
        "last_logits": first[:, -1, :].tolist(), "rss_before_mb": rss0, "peak_rss_mb": _rss_mb("VmHWM"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
