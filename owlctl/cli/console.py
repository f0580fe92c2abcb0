"""stdout carries results only; everything else (logs, hints, progress) goes to stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator



class _LazyConsole:
    """A rich Console created on first use: `owlctl allocate --json` never needs to import rich."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Any = None

    def get(self) -> Any:
        """The real rich Console (created now if needed): pass this, not the proxy, to rich."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    # Dunder methods bypass __getattr__; rich's Live does `with console:`.
    def __enter__(self) -> Any:
        return self.get().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.get().__exit__(*exc)


out = _LazyConsole(soft_wrap=True)  # results
err = _LazyConsole(stderr=True, soft_wrap=True)  # logs, warnings, progress

_quiet = False


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q


def quiet() -> bool:
    return _quiet


def log(msg: str) -> None:
    """A plain message on stderr (no rich markup is interpreted in ``msg``)."""
    if not _quiet:
        err.print(msg, highlight=False, markup=False)


def warn(msg: str) -> None:
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


class Progress:
    """Progress reporter handed to ops: a rich bar on stderr when it is a terminal and not quiet."""

    def __init__(self) -> None:
        self._enabled = (not _quiet) and err.is_terminal
        self._progress = None

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        if not self._enabled:
            yield _NullTask()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

        with RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=err.get(), transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield _RichTask(p, tid)


class _NullTask:
    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass


class _RichTask:
    def __init__(self, p: Any, tid: Any) -> None:
        self.p, self.tid = p, tid

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if info is None:
            self.p.update(self.tid, advance=n)
        else:
            self.p.update(self.tid, advance=n, info=info)


@contextmanager
def _owlctl_warnings_to_stderr() -> Iterator[None]:
    """Show the ops layer's OwlctlWarnings as `warning: ...` lines (every time, not once per place)."""
    import warnings

    from owlctl.errors import OwlctlWarning

    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if issubclass(category, OwlctlWarning):
                warn(str(message))
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", OwlctlWarning)
        warnings.showwarning = show
        yield


def handle_errors(fn):
    """Decorator for command bodies: known failures -> message + hint on stderr, exit 1; Ctrl-C -> 130.

    Unknown exceptions are bugs and keep their traceback. OWLCTL_DEBUG=1 shows tracebacks always.
    """
    import functools
    import os

    import typer

    from owlctl.errors import OwlctlError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _owlctl_warnings_to_stderr():
                return fn(*args, **kwargs)
        except OwlctlError as e:
            if os.environ.get("OWLCTL_DEBUG") == "1":
                raise
            from rich.markup import escape

            err.print(f"[red]error:[/red] {escape(e.message)}", highlight=False)
            if e.hint:
                err.print(f"[dim]hint:[/dim] {escape(e.hint)}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]: no partial output was left behind", highlight=False)
            raise typer.Exit(130) from None

    return wrapper
