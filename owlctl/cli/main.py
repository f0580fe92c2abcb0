"""owlctl's command line. Top-level imports: typer, rich, stdlib only (torch loads inside commands)."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from owlctl import __version__

app = typer.Typer(
    name="owlctl",
    help="Prune large language models with OWL (Outlier Weighed Layerwise sparsity, ICML 2024).\n\n"
    "Pipeline: profile -> allocate -> prune / nm -> eval; finetune, export and bench after that. "
    "Every step reads and writes files, so each can be re-run alone.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module defines register(app). Order = order in --help.
COMMAND_MODULES = ["pipeline", "profile", "allocate", "search", "prune", "eval", "finetune", "export", "bench",
                   "generate"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"owlctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Prune large language models with OWL."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"owlctl.cli.{_name}").register(app)


def run() -> None:
    app(prog_name="owlctl")
