"""Progress of long work and what a phase is doing, independent of how it is shown (stdlib only).

Engine and ops code report through two things:
  - ``note(msg)``: one line about a phase ("loading ...", "tokenising ..."), sent to the ``owlctl`` logger;
    the CLI prints it on stderr (nothing with -q); a Python API user sees it only if they configure logging.
  - ``task(progress, description, total)``: a context manager yielding an object with ``advance(n, info)``;
    ``progress`` is the reporter the caller passed in (the CLI's bar or plain lines), or None for silence.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

logger = logging.getLogger("owlctl")


def note(msg: str) -> None:
    logger.info(msg)


class NullTask:
    """A task that reports nothing (no reporter, or -q)."""

    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass


@contextmanager
def task(progress: Any, description: str, total: int | None) -> Iterator[Any]:
    """A task of ``progress`` (see owlctl.cli.console.Progress), or a silent one when it is None."""
    if progress is None:
        yield NullTask()
        return
    with progress.task(description, total) as t:
        yield t


def interactive(progress: Any) -> bool:
    """True when ``progress`` draws live bars on a terminal (so third-party bars may show too)."""
    return bool(getattr(progress, "interactive", False))
