"""How far the driver's block-by-block propagation is from the model's own forward, per block, on a real model:
owlctl's driver (every block fed its own inputs) vs the old scheme (block 0's keyword inputs replayed for every
block, as the reference's Catcher and owlctl before issue 9 did). Dense weights, float32, windows of the
builtin:wiki test split (with the model's BOS setting, --bos auto).

  python benchmarks/propagation.py --model builtin:gemma3-270m --seqlen 512 --windows 4
  python benchmarks/propagation.py --model builtin:gemma3-270m --seqlen 1024 --windows 2   # beyond the window

Writes docs/propagation-<model>-<seqlen>-<bos>.json: per block the relative error ||h - h_model|| / ||h_model||
of the block's output over all positions, and over positions 1.. (position 0 is the same under every mask and
rotary table, and with a BOS it carries the massive activations that dominate the norm), for both schemes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def replay_block0(model, layout, ids, batch_size):
    """The old scheme: capture block 0's inputs with a pre-hook, replay its keyword inputs for every block."""
    import torch

    captured = []

    def pre(_m, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    h = layout.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        batches = []
        for s in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[s:s + batch_size], use_cache=False)
            except _Stop:
                pass
            args, kw = captured.pop()
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "cache", "use_cache")}
            hidden = args[0] if args else kw.pop("hidden_states")
            batches.append((hidden, tuple(args[1:]), kw))
    finally:
        h.remove()
    outs = []
    with torch.inference_mode():
        for block in layout.blocks:
            new = []
            for hidden, args, kw in batches:
                o = block(hidden, *args, **kw)
                new.append(o[0] if isinstance(o, tuple) else o)
            batches = [(o, a, k) for o, (_h, a, k) in zip(new, batches)]
            outs.append(torch.cat(new))
    return outs


def owlctl_driver(model, layout, ids, batch_size):
    import torch

    from owlctl.engine.calibration.driver import run_blocks
    from owlctl.engine.models.hosts import InMemory

    outs = {i: [] for i in range(layout.num_blocks)}
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(layout.blocks)]
    try:
        run_blocks(InMemory(model, layout), ids, device="cpu", batch_size=batch_size, needs=frozenset(),
                   decide=lambda *a: None, propagate="dense")
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(outs[i]) for i in range(layout.num_blocks)]


def model_outputs(model, layout, ids):
    import torch

    outs = {}
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(layout.blocks)]
    try:
        with torch.inference_mode():
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [outs[i] for i in range(layout.num_blocks)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:gemma3-270m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--bos", default="auto", choices=["auto", "always", "never"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from owlctl.engine.data import resolve_bos
    from owlctl.engine.evaluation.perplexity import windows
    from owlctl.engine.evaluation.texts import token_streams
    from owlctl.engine.models import load_model
    from owlctl.families import resolve

    model, tok, info = load_model(args.model)
    layout = resolve(model)
    bos = resolve_bos(tok, args.bos)
    ids = token_streams(["builtin:wiki"], "test", tok, bos)["builtin:wiki"]
    wins = windows(ids, args.seqlen, args.windows, int(tok.bos_token_id) if bos == "always" else None)
    want = model_outputs(model, layout, wins)
    old = replay_block0(model, layout, wins, args.batch_size)
    new = owlctl_driver(model, layout, wins, args.batch_size)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    types = getattr(model.config, "layer_types", None) or [None] * layout.num_blocks
    rows = [{"block": i, "layer_type": types[i], "replay_block0": rel(old[i], want[i]), "owlctl": rel(new[i], want[i]),
             "replay_block0_from_pos1": rel(old[i][:, 1:], want[i][:, 1:]),
             "owlctl_from_pos1": rel(new[i][:, 1:], want[i][:, 1:])}
            for i in range(layout.num_blocks)]
    doc = {"model": info.id, "seqlen": args.seqlen, "windows": int(wins.shape[0]), "bos": bos,
           "data": "builtin:wiki test split", "batch_size": args.batch_size,
           "sliding_window": getattr(model.config, "sliding_window", None), "threads": torch.get_num_threads(),
           "rows": rows}
    name = info.id.split(":")[-1]
    out = Path(args.out or ROOT / "docs" / f"propagation-{name}-{args.seqlen}-{bos}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{info.id}, {doc['windows']} windows of {args.seqlen}, bos {bos}")
    print(f"{'block':>5} {'type':>18} {'block-0 replay':>15} {'owlctl':>10} {'replay pos>=1':>14} {'owlctl pos>=1':>14}")
    for r in rows:
        print(f"{r['block']:>5} {str(r['layer_type']):>18} {r['replay_block0']:>15.3e} {r['owlctl']:>10.3e} "
              f"{r['replay_block0_from_pos1']:>14.3e} {r['owlctl_from_pos1']:>14.3e}")


if __name__ == "__main__":
    main()
