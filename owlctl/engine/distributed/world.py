"""The process group of a launched run: joining it, checking that every process was given the same work,
agreeing on failures before the work starts, sharding batches, and timed collectives (see __init__.py).

Failures: before the work starts, every collective is an ``exchange`` of (status, text), so a process that
fails (bad input, a busy output, a missing file) tells the others in the exchange they are waiting in, and
rank 0 prints one message. Once the work runs, a process that dies makes the others' next collective fail
(the peer is gone, or the timeout passes), and the launcher stops the rest; rank 0's output claim then
removes its partial output.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from owlctl.engine.distributed import _CURRENT, current, launched, timeout_s
from owlctl.errors import InputError, OwlctlError


class DistributedError(OwlctlError):
    """A failure of the process group: another process failed, died, or did not answer in time."""


class World:
    """This process's place in the group: rank, size, backend, device; seconds spent in collectives."""

    def __init__(self, rank: int, size: int, local_rank: int, backend: str, device: str) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.backend, self.device = backend, device
        self.collective_s = 0.0
        self.working = False  # inside a work phase: collectives other than exchanges are running
        self.broken = False  # a work phase failed here: the others are not waiting in an exchange

    @property
    def main(self) -> bool:
        return self.rank == 0

    def resolve(self, asked: str) -> str:
        """The compute device for ``--device asked``: the group's device (cuda:LOCAL_RANK on CUDA)."""
        if asked.startswith("cuda:") and self.size > 1:
            raise InputError(f"--device {asked} names one GPU, but {self.size} processes share the run",
                             hint="use --device cuda: each process takes cuda:LOCAL_RANK")
        return self.device

    # ------------------------------------------------------------------------------------ collectives
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"another process of the run stopped or did not answer ({what}: {first}); nothing was written",
                hint="look for the failing process's message above; the collective timeout is "
                     "$OWLCTL_DIST_TIMEOUT seconds") from None
        finally:
            self.collective_s += time.perf_counter() - t0

    def exchange(self, status: str, text: str) -> list[tuple[str, str]]:
        """Every process's (status, text), in rank order."""
        got: list[Any] = [None] * self.size
        with self._collective("exchange"):
            dist.all_gather_object(got, (status, text))
        return got

    def check_same(self, what: str, digest: str) -> None:
        """Fail on every process unless all give the same ``digest`` (a hash of their resolved settings)."""
        got = self._raise_failures(self.exchange("ok", digest))
        differ = [r for r, (_s, d) in enumerate(got) if d != got[0][1]]
        if differ:
            raise InputError(f"the processes of this run were given different {what}: rank(s) "
                             f"{', '.join(map(str, differ))} differ from rank 0",
                             hint="start every process with the same command line and files (torchrun passes "
                                  "one command to all)")

    def _raise_failures(self, got: list[tuple[str, str]]) -> list[tuple[str, str]]:
        failed = [(r, text) for r, (status, text) in enumerate(got) if status == "error"]
        if failed:
            r, text = failed[0]
            err = DistributedError(f"process rank {r} of {self.size} failed: {text}")
            err.owlctl_silent = not self.main  # type: ignore[attr-defined]
            raise err
        return got

    @contextmanager
    def work(self, fingerprint: str = "") -> Iterator[World]:
        """A work phase: first every process says it is ready (or why it failed) and that it has the same
        inputs (``fingerprint``, e.g. of the token ids); then the phase's collectives run."""
        self.check_same("inputs (calibration or evaluation tokens)", fingerprint)
        self.working = True
        try:
            yield self
        except BaseException:
            self.broken = True
            raise
        finally:
            self.working = False

    def fail(self, exc: BaseException) -> None:
        """This process failed outside a work phase: tell the others, who wait in an exchange."""
        if self.working or self.broken:
            return
        text = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        try:
            self.exchange("error", str(text))
        except DistributedError:
            pass

    def all_reduce_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        with self._collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        with self._collective(what):
            dist.broadcast(t, src=src)
        return t

    # ------------------------------------------------------------------------------------ sharding
    def batches(self, n_items: int, batch_size: int, what: str) -> list[int]:
        """This rank's batches of ``n_items`` in batches of ``batch_size``: b with b % size == rank."""
        n_batches = -(-n_items // batch_size)
        if self.size > n_batches:
            raise InputError(f"{self.size} processes but only {n_batches} batch(es) of {what} "
                             f"({n_items} sequence(s), --batch-size {batch_size}): some processes would have "
                             "nothing to do", hint=f"start at most {n_batches} processes, or lower --batch-size, "
                                                   "or raise --nsamples / --max-windows")
        return list(range(self.rank, n_batches, self.size))

    def take(self, rows: torch.Tensor, batch_size: int, what: str) -> tuple[torch.Tensor, list[int]]:
        """(this rank's rows of ``rows`` in order, its batch indices): batching the result by ``batch_size``
        gives exactly this rank's batches of the one-process run."""
        mine = self.batches(rows.shape[0], batch_size, what)
        idx = torch.cat([torch.arange(b * batch_size, min((b + 1) * batch_size, rows.shape[0])) for b in mine])
        return rows[idx], mine


def fingerprint(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def settings_digest(command: str, cfg: Any) -> str:
    import dataclasses

    from owlctl import __version__

    doc = {"command": command, "owlctl": __version__, "torch": torch.__version__,
           "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _backend_and_device(asked: str, local_rank: int) -> tuple[str, str]:
    wants_cuda = asked.startswith("cuda") or (asked == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return "gloo", "cpu"
    if not torch.cuda.is_available():
        raise InputError(f"--device {asked} asked for, but CUDA is not available here", hint="use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible",
                         hint="start at most one process per GPU (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return "nccl", f"cuda:{local_rank}"


@contextmanager
def session(command: str, cfg: Any) -> Iterator[World | None]:
    """Join the launcher's process group for one command (None and nothing else in a single process);
    check that every process runs the same command with the same settings; on a failure before the work,
    tell the others; leave the group at the end."""
    env = launched()
    if env is None or current() is not None:  # a single process, or a command inside a running one
        yield current()
        return
    rank, size, local_rank = env
    backend, device = _backend_and_device(str(getattr(cfg, "device", "cpu")), local_rank)
    timeout = datetime.timedelta(seconds=timeout_s())
    kw = {"device_id": torch.device(device)} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout, **kw)
    world = World(rank, size, local_rank, backend, device)
    _CURRENT.append(world)
    try:
        try:
            world.check_same("settings (command line)", settings_digest(command, cfg))
            yield world
        except Exception as e:
            if not isinstance(e, DistributedError):
                world.fail(e)
            if not world.main:
                if not world.broken or isinstance(e, DistributedError):
                    e.owlctl_silent = True  # type: ignore[attr-defined]  rank 0 or the failing process reports it
                else:
                    e.owlctl_rank = world.rank  # type: ignore[attr-defined]  its own failure, shown with its rank
            raise
    finally:
        _CURRENT.remove(world)
        dist.destroy_process_group()
