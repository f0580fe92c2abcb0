"""Typer commands built from the config dataclasses of ``owlctl.ops``.

Each config field that carries an ``owlctl.options.Opt`` becomes one Typer parameter: the flags, help,
choices (an Enum: listed in --help, exit 2 when wrong, completed by bash/zsh/fish), ranges and the default
all come from that one declaration. The command body receives the finished config, so the signature,
the call and the dataclass are no longer written three times.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer

from owlctl.options import Opt, check_device

# CLI-only switches shared by every command: (parameter name, annotation, default).
JSON = ("json_out", Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")],
        False)
QUIET = ("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")], False)


def parse_device(value: Any) -> str:
    """--device: cpu | cuda | cuda:N | auto (a usage error, exit 2, otherwise)."""
    from owlctl.errors import InputError

    try:
        return check_device(value)
    except InputError as e:
        raise typer.BadParameter(f"{e.message} ({e.hint})") from None


def complete_device(incomplete: str) -> list[str]:
    return [w for w in ("auto", "cpu", "cuda", *[f"cuda:{i}" for i in range(8)]) if w.startswith(incomplete)]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The command's own fields first (in declaration order), then those of its option groups."""
    own = set(cls.__dict__.get("__annotations__", {}))
    fs = [f for f in dataclasses.fields(cls) if "cli" in f.metadata]
    return [f for f in fs if f.name in own] + [f for f in fs if f.name not in own]


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    o: Opt = f.metadata["cli"]
    base, optional = _unwrap_optional(o.cli_type if o.cli_type is not None else hint)
    kwargs: dict[str, Any] = {"help": o.help, "show_default": o.show_default}
    if o.metavar:
        kwargs["metavar"] = o.metavar
    if o.choices is not None:
        base = o.choices
    elif o.kind == "device":
        base, kwargs["parser"], kwargs["autocompletion"] = str, parse_device, complete_device
    if o.min is not None:
        kwargs["min"] = o.min
    if o.max is not None:
        kwargs["max"] = o.max
    if o.multiple:
        base, optional = list[base], True  # type: ignore[valid-type]
    default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    if o.choices is not None and default not in (None, inspect.Parameter.empty):
        default = o.choices(default.value if isinstance(default, Enum) else default)
    if o.parse is not None and o.cli_type is not None and isinstance(default, (tuple, list)):
        default = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default)
    if default is None:
        optional = True
    info = typer.Argument(**kwargs) if o.argument else typer.Option(*o.decls, **kwargs)
    annotation = Annotated[Optional[base] if optional else base, info]  # type: ignore[valid-type]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def config_params(config_cls: type, exclude: Sequence[str] = ()) -> tuple[list[inspect.Parameter], list[str]]:
    hints = typing.get_type_hints(config_cls)
    fs = [f for f in _ordered_fields(config_cls) if f.name not in exclude]
    params = [_parameter(f, hints[f.name]) for f in fs]
    # positional arguments first, as a reader of --help expects
    params.sort(key=lambda p: 0 if isinstance(typing.get_args(p.annotation)[1], typer.models.ArgumentInfo) else 1)
    return params, [f.name for f in fs]


def build_config(config_cls: type, values: dict[str, Any], fixed: dict[str, Any] | None = None) -> Any:
    """The config from parsed CLI values (Enums -> strings, ``Opt.parse`` applied) plus ``fixed`` fields."""
    kw: dict[str, Any] = dict(fixed or {})
    by_name = {f.name: f for f in dataclasses.fields(config_cls)}
    for name, value in values.items():
        o: Opt = by_name[name].metadata["cli"]
        value = _plain(value)
        if o.parse is not None and value is not None:
            value = o.parse(value)
        kw[name] = value
    return config_cls(**kw)


def command(app: typer.Typer, name: str, config_cls: type, body: Callable[..., Any], *, help: str,
            exclude: Sequence[str] = (), extra: Sequence[tuple[str, Any, Any]] = (JSON, QUIET),
            fixed: dict[str, Any] | None = None, **command_kwargs: Any) -> Callable[..., Any]:
    """Register command ``name``: its parameters are ``config_cls``'s declared fields (minus ``exclude``)
    plus the CLI-only ``extra`` parameters; ``body(cfg, **extra_values)`` runs it."""
    from owlctl.cli import console

    params, names = config_params(config_cls, exclude)
    for pname, annotation, default in extra:
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    extra_names = [e[0] for e in extra]

    def run(**kwargs: Any) -> Any:
        from owlctl.engine.distributed import secondary

        cfg = build_config(config_cls, {k: kwargs[k] for k in names}, fixed)
        if secondary():  # a launched process other than rank 0: rank 0 prints the results and the progress
            import contextlib
            import io

            console.set_quiet(True)
            with contextlib.redirect_stdout(io.StringIO()):
                return body(cfg, **{k: kwargs[k] for k in extra_names})
        console.set_quiet(bool(kwargs.get("quiet", False)))
        return body(cfg, **{k: kwargs[k] for k in extra_names})

    run.__name__ = f"{name.replace('-', '_')}_cmd"
    run.__doc__ = help
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    wrapped = console.handle_errors(run)
    wrapped.__signature__ = run.__signature__  # type: ignore[attr-defined]
    wrapped.__annotations__ = run.__annotations__
    app.command(name, help=help, **command_kwargs)(wrapped)
    return wrapped


__all__ = ["command", "build_config", "config_params", "parse_device", "JSON", "QUIET", "Path"]
