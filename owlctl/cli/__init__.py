"""The Typer skin: parse options, build a config, call owlctl.ops, render. Imports typer/rich/stdlib only."""
