"""A pruned model written to disk while it is pruned: each block's tensors go into the checkpoint's weight
files as soon as the block is done (a streamed model never holds more than one block), the rest at the end,
then config, tokenizer and owlctl's records (formats/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def weights_writer(tmp: Path, host: Any, info: Any, alloc: dict) -> Any:
    """The checkpoint's weight files, planned before the first block (names as in the source checkpoint)."""
    from owlctl.engine.models.stream import Weights, source_names
    from owlctl.formats.checkpoint import WeightsWriter

    if host.streamed:
        names = host.names
    else:
        names = (source_names(host.model, Weights(Path(info.path)))
                 if any(Path(info.path).glob("*.safetensors")) else None)
    return WeightsWriter(tmp, host.model, alloc, names)


def block_saver(writer: Any, host: Any) -> Callable[[int, Any], None]:
    """The driver's ``after`` callback: block i's tensors into the checkpoint while it is on the device."""
    prefix = host.layout.blocks_path

    def after(i: int, block: Any) -> None:
        writer.write_module(f"{prefix}.{i}", block)

    return after


def finish_checkpoint(writer: Any, tmp: Path, host: Any, tok: Any, info: Any, alloc: dict, report: dict,
                      method: str) -> None:
    """The tensors outside the blocks (copied from the source files when streamed), then the records."""
    from owlctl.formats.checkpoint import write_records
    from owlctl.formats.shards import state_entries

    own = dict(state_entries(host.model))
    if host.streamed:
        writer.write_rest(lambda name: host.source_tensor(name) if name in host.names else own[name])
    else:
        writer.write_rest(own.__getitem__)
    writer.close()
    write_records(tmp, host.model, tok, allocation=alloc, report=report,
                  source={"id": info.id, "content_sha256": info.content_sha256, "method": method},
                  source_dir=Path(info.path))
