"""Where the driver gets each block from: a model held in memory, or a model streamed from its files.

Both hosts give the same two things: ``block(i, device)``, a context in which block i is on the compute
device (and after which it is back where it lives: in host memory, or nowhere), and ``outside(device,
head)``, a context in which the modules outside the blocks (embeddings, rotary tables, final norm, and with
``head`` the LM head) are on the device. The driver, the evaluation and the checkpoint writer only use these,
so every command runs on either.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from owlctl.errors import ModelError


def _outside_modules(model: Any, layout: Any, head: bool) -> list[Any]:
    """Modules outside the decoder blocks that own parameters or buffers (the LM head only with ``head``,
    unless it is tied to the input embedding, which the blocks' inputs need anyway)."""
    prefix = layout.blocks_path + "."
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    mods = []
    for name, m in model.named_modules():
        if name == layout.blocks_path or name.startswith(prefix):
            continue
        if not m._parameters and not m._buffers:
            continue
        if m is out_emb and not head and not tied:
            continue
        mods.append(m)
    return mods


class InMemory:
    """A model whose weights are all in host memory; blocks visit the device one at a time."""

    streamed = False

    def __init__(self, model: Any, layout: Any = None) -> None:
        self.model = model
        self._layout = layout

    @property
    def layout(self) -> Any:
        """The blocks and Linears (resolved when first needed: a model owlctl cannot walk is still evaluable)."""
        if self._layout is None:
            from owlctl.families import resolve

            self._layout = resolve(self.model)
        return self._layout

    @contextmanager
    def block(self, i: int, device: str) -> Iterator[Any]:
        blk = self.layout.blocks[i]
        if device != "cpu":
            blk.to(device)
        try:
            yield blk
        finally:
            if device != "cpu":
                blk.to("cpu")

    @contextmanager
    def outside(self, device: str, head: bool = False) -> Iterator[None]:
        mods = _outside_modules(self.model, self.layout, head=True)
        if device != "cpu":
            for m in mods:
                m.to(device)
        try:
            yield
        finally:
            if device != "cpu":
                for m in mods:
                    m.to("cpu")

    def close(self) -> None:
        pass


class Streamed:
    """A model whose parameters are read from its safetensors files when a block or the outside modules are
    needed, and dropped afterwards (see engine/models/stream.py)."""

    streamed = True

    def __init__(self, path: Path, dtype: Any = None, trust_remote_code: bool = False) -> None:
        from owlctl.engine.models.stream import Weights, checkpoint_dtype, skeleton, source_names
        from owlctl.families import resolve

        self.weights = Weights(path)
        if dtype is None:
            from transformers import AutoConfig

            dtype = checkpoint_dtype(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code),
                                     self.weights)
        self.dtype = dtype
        self.model = skeleton(path, dtype, trust_remote_code)
        self.layout = resolve(self.model)
        # every owner (module, attribute, full name) of each parameter object: tied weights are one group
        self._owners: dict[int, list[tuple[Any, str, str]]] = {}
        for mod_name, mod in self.model.named_modules(remove_duplicate=False):
            for leaf, p in mod._parameters.items():
                if p is not None:
                    self._owners.setdefault(id(p), []).append((mod, leaf, f"{mod_name}.{leaf}" if mod_name else leaf))
        self.names = source_names(self.model, self.weights)
        self._check_keys()

    def _key(self, names: list[str]) -> str | None:
        for n in names:
            if n in self.names:
                return self.names[n]
        return None

    def _check_keys(self) -> None:
        missing = [owners[0][2] for owners in self._owners.values() if self._key([o[2] for o in owners]) is None]
        if missing:
            raise ModelError(f"{self.weights.path}: {len(missing)} of the model's weights are not in its safetensors "
                             f"files under the names transformers uses (first: {missing[0]})",
                             hint="this checkpoint's tensor names need a conversion transformers applies on "
                                  "loading; run with --offload none (the whole model in memory)")

    def _swap(self, old: Any, new: Any) -> None:
        owners = self._owners.pop(id(old))
        for mod, leaf, _ in owners:
            mod._parameters[leaf] = new
        self._owners[id(new)] = owners

    def materialise(self, modules: list[Any], device: str) -> None:
        import torch.nn as nn

        for mod in modules:
            for leaf, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                owners = self._owners[id(p)]
                key = self._key([o[2] for o in owners])
                t = self.weights.get(key, device, self.dtype if p.is_floating_point() else None)
                self._swap(p, nn.Parameter(t, requires_grad=False))
            for leaf, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[leaf] = b.to(device)

    def release(self, modules: list[Any]) -> None:
        import torch
        import torch.nn as nn

        for mod in modules:
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    self._swap(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                               requires_grad=False))
            for leaf, b in list(mod._buffers.items()):
                if b is not None and b.device.type != "cpu":
                    mod._buffers[leaf] = b.to("cpu")

    @contextmanager
    def block(self, i: int, device: str) -> Iterator[Any]:
        blk = self.layout.blocks[i]
        mods = list(blk.modules())
        self.materialise(mods, device)
        try:
            yield blk
        finally:
            self.release(mods)

    @contextmanager
    def outside(self, device: str, head: bool = False) -> Iterator[None]:
        mods = _outside_modules(self.model, self.layout, head)
        self.materialise(mods, device)
        try:
            yield
        finally:
            self.release(mods)

    def source_tensor(self, name: str) -> Any:
        """A tensor of the checkpoint by its name in the model, on the host, in the model's dtype."""
        owners = next((o for o in self._owners.values() if any(n == name for _m, _l, n in o)), None)
        key = self._key([o[2] for o in owners] if owners else [name])
        if key is None:
            raise ModelError(f"{name} is not in {self.weights.path}")
        t = self.weights.get(key, "cpu")
        return t.to(self.dtype) if t.is_floating_point() else t

    def close(self) -> None:
        self.weights.close()
