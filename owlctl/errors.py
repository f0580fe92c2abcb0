"""Errors that owlctl expects: each carries a message and a hint, and the CLI turns it into exit 1."""

from __future__ import annotations


class OwlctlError(Exception):
    """A known failure. ``hint`` tells the user what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class InputError(OwlctlError):
    """Bad user input (a value out of range, a file of the wrong kind)."""


class FormatError(OwlctlError):
    """An owlctl file that is missing, truncated, of another schema or hand-edited badly."""


class ModelError(OwlctlError):
    """A model that cannot be loaded or whose architecture owlctl cannot walk."""


class DataError(OwlctlError):
    """Calibration or evaluation data that cannot be found or is too short."""


class OutputExistsError(OwlctlError):
    """An output path exists and --force was not given."""


class OutputError(OwlctlError):
    """An output that cannot be written where asked (busy, read-only, too small a disk, the input itself)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so cleanup runs exactly as for Ctrl-C (the CLI exits 143)."""


class OwlctlWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as `warning: ...`."""
