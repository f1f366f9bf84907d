"""Typed settings <-> command-line flags, for every script.

A script's settings are frozen dataclasses. Each field carries its help text (and, where the flag is
not simply --field-name, its flag) in its metadata, so a setting is declared once:

    @dataclass(frozen=True)
    class ProxConfig:
        mu: float = setting(0.05, "proximal weight")                 # -> --mu MU
        local: OptimConfig = section(OptimConfig, "local training", flags={"lr": "--lr"})  # -> --lr, --local-epochs ...

`flags_of(Config, title=...)` lists the flags of a config (nested sections become --<section>-<field>
with dest <section>_<field>), `add_flags` puts them on a parser, and `config_from(Config, args)` builds
the config back from the parsed namespace. A bool that defaults to True becomes a --no-... switch.
Nothing here imports torch, so a script's --help stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
            dest: str | None = None, choices: typing.Iterable | None = None, metavar: str | None = None,
            minimum: float | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also a flag. flag: its name if not --<dest with dashes>; dest: its
    argparse dest (and settings key) if not the field name under the section prefix; minimum: the
    smallest value the flag accepts (checked as it is parsed, so the error names the flag)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "dest": dest, "minimum": minimum,
            "choices": tuple(choices) if choices is not None else None, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(factory: Callable[[], Any], title: str, *, flags: dict[str, str] | None = None,
            prefix: str | None = None) -> Any:
    """A nested config: its fields become flags in their own help group `title`, named
    --<prefix>-<field> (prefix: the field name) unless `flags` renames them (field -> flag)."""
    return field(default_factory=factory, metadata={"title": title, "flags": dict(flags or {}), "prefix": prefix})


@dataclass(frozen=True)
class Flag:
    """One flag of a config: where its value goes (path of field names), its argparse dest and name."""
    path: tuple[str, ...]
    dest: str
    names: tuple[str, ...]
    kind: type            # int, float, str or bool; the element type of a tuple
    many: bool            # a comma-separated tuple
    default: Any
    help: str
    choices: tuple | None
    metavar: str | None
    minimum: float | None
    title: str

    def same_declaration(self, other: Flag) -> bool:
        """Two configs declare this flag alike (its default may differ: each config keeps its own)."""
        keys = ("dest", "names", "kind", "many", "help", "choices", "metavar", "minimum")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _scalar(hint: Any) -> tuple[type, bool]:
    """(element type, is a tuple) of a field's annotation; Optional[X] is X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if args and typing.get_origin(hint) is not None:  # X | None
        return _scalar(args[0])
    return hint, False


def flags_of(cls: type, *, title: str, default: Any = None, prefix: str = "", renames: dict[str, str] | None = None,
             path: tuple[str, ...] = ()) -> list[Flag]:
    """The flags of dataclass `cls` (its `default` instance gives the defaults shown and used)."""
    hints = typing.get_type_hints(cls)
    default = default if default is not None else cls()
    renames = renames or {}
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        meta, value = f.metadata, getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if "title" not in meta:
                raise TypeError(f"{cls.__name__}.{f.name}: a nested config must be declared with section(...)")
            sub_prefix = f"{prefix}{meta['prefix'] if meta['prefix'] is not None else f.name}_"
            out += flags_of(type(value), title=meta["title"], default=value, prefix=sub_prefix,
                            renames=meta["flags"], path=(*path, f.name))
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(default, help) so that it has a flag")
        kind, many = _scalar(hints[f.name])
        dest = meta["dest"] or prefix + f.name
        name = renames.get(f.name) or meta["flag"] or "--" + ("no-" if kind is bool and value else "") + dest.replace("_", "-")
        out.append(Flag(path=(*path, f.name), dest=dest, names=(name, *meta["aliases"]), kind=kind, many=many,
                        default=value, help=meta["help"], choices=meta["choices"], metavar=meta["metavar"],
                        minimum=meta["minimum"], title=title))
    return out


def _parser_of(fl: Flag) -> Callable[[str], Any]:
    def one(text: str) -> Any:
        value = fl.kind(text)
        if fl.minimum is not None and value < fl.minimum:
            raise argparse.ArgumentTypeError(f"must be >= {fl.minimum:g}, got {text}")
        return value

    def parse(text: str) -> Any:
        return tuple(one(v) for v in text.split(",")) if fl.many else one(text)
    # argparse names the type in its error message for a value it cannot read
    parse.__name__ = f"comma-separated {fl.kind.__name__}s" if fl.many else fl.kind.__name__
    return parse


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], *, groups: dict[str, Any] | None = None,
              hidden: bool = False) -> None:
    """Adds `flags` to `parser`, one help group per title (`groups` reuses groups already made).
    hidden: accepted but not shown and absent from the namespace unless given (another method's flags)."""
    groups = {} if groups is None else groups
    for fl in flags:
        target = parser if hidden else groups.get(fl.title) or groups.setdefault(fl.title, parser.add_argument_group(fl.title))
        extra: dict[str, Any] = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS} if hidden else \
            {"default": fl.default, "help": fl.help}
        if fl.kind is bool:
            target.add_argument(*fl.names, dest=fl.dest, action="store_false" if fl.default else "store_true", **extra)
            continue
        target.add_argument(*fl.names, dest=fl.dest, type=_parser_of(fl),
                            choices=fl.choices, metavar=fl.metavar, **extra)


def config_from(cls: type, values: dict[str, Any], *, default: Any = None, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from {dest: value} (e.g. vars(args)); a dest that is absent keeps
    the default instance's value."""
    default = default if default is not None else cls()
    changes = {}
    for fl in flags_of(cls, title="", default=default, prefix=prefix):
        if fl.dest in values:
            changes[fl.path] = tuple(values[fl.dest]) if fl.many else values[fl.dest]
    return _replace(default, changes)


def _replace(obj: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    direct = {p[0]: v for p, v in changes.items() if len(p) == 1}
    nested: dict[str, dict] = {}
    for p, v in changes.items():
        if len(p) > 1:
            nested.setdefault(p[0], {})[p[1:]] = v
    for name, sub in nested.items():
        direct[name] = _replace(getattr(obj, name), sub)
    return dataclasses.replace(obj, **direct) if direct else obj
