"""Run by tests/engine/test_distributed.py, in one process or under torchrun: profile, four prunes (wanda and
sparsegpt x uniform and OWL, one of them streamed from disk) and two perplexities of a tiny model, through
the Python API; rank 0 writes what it got to OUT/results.json. Under torchrun the commands share one process
group (joined here, so each command finds it), with a barrier where a command reads what rank 0 wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, model: str, corpus: str) -> None:
    import torch

    torch.set_num_threads(1)
    from owlctl.engine.distributed import session
    from owlctl.ops.evaluate import EvalConfig, evaluate
    from owlctl.ops.profile import ProfileConfig, profile
    from owlctl.ops.prune import PruneConfig, prune

    calib = dict(calib=corpus, nsamples=12, seqlen=32, batch_size=2, device="cpu")
    with session("test-suite", {"out": str(out)}) as world:
        def barrier() -> None:
            if world is not None:
                import torch.distributed as dist

                dist.barrier()

        res: dict = {"world": 1 if world is None else world.size}
        prof = profile(ProfileConfig(model=model, output=out / "profile.json", **calib))
        res["profile"] = [b["outlier_count"] for b in prof["blocks"]]
        barrier()
        runs = {"wanda-uniform": dict(method="wanda", uniform=True),
                "wanda-owl": dict(method="wanda", from_profile=out / "profile.json", outlier_m=5.0, lam=0.08),
                "sparsegpt-uniform": dict(method="sparsegpt", uniform=True, offload="disk"),
                "sparsegpt-owl": dict(method="sparsegpt", from_profile=out / "profile.json", outlier_m=5.0,
                                      lam=0.08)}
        for name, kw in runs.items():
            doc = prune(PruneConfig(model=model, output=out / name, target_sparsity=0.5, **calib, **kw))
            res[name] = [b["realised_sparsity"] for b in doc["blocks"]]
        barrier()
        res["ppl"] = {}
        for name, offload in (("dense", "none"), ("wanda-uniform", "disk")):
            spec = model if name == "dense" else str(out / name)
            doc = evaluate(EvalConfig(model=spec, data=(corpus,), seqlen=32, batch_size=2, max_windows=12,
                                      device="cpu", offload=offload))
            res["ppl"][name] = next(iter(doc["perplexity"].values()))["window_nll"]
        if world is None or world.main:
            (out / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
