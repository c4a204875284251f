"""Registries of passes and targets, and the typed parameters that make up the CLI schema.

A pass is a function `fn(graph, ctx, *, param: type = default, ...)`; a target is a class whose `__init__`
takes keyword-only typed parameters. The signature *is* the schema: `--passes "prune(ratio=0.5)"` is bound and
validated against it, and `squeeze passes` prints it. Help and bounds ride along in `typing.Annotated`:

    ratio: Annotated[float, Range(0.0, 1.0, hi_open=True), "fraction of channels to remove"] = 0.3
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin

from .errors import SpecError


@dataclass(frozen=True)
class Range:
    """Closed (or half-open) numeric bounds for a parameter."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any
    help: str = ""
    range: Range | None = None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


@dataclass(frozen=True)
class Backoff:
    """How the accuracy guard (`--max-drop`) weakens a pass.

    `param` is the strength parameter and `weaken` maps a value to a weaker one (None when it cannot go weaker).
    If `skip` names a list parameter of layer names, the guard first leaves the most sensitive layers untouched;
    the pass must then list the layers it changed in `ctx.details["layers"]`.
    """

    param: str
    weaken: Callable[[Any], Any]
    skip: str | None = None


def halve(floor: float = 0.02) -> Callable[[float], float | None]:
    """Weaken a ratio-like strength by halving it, until it falls below `floor`."""
    return lambda v: (v / 2 if v / 2 >= floor else None)


def step_up(limit: int) -> Callable[[int], int | None]:
    """Weaken a bits-like strength by one step up, until `limit`."""
    return lambda v: (v + 1 if v + 1 <= limit else None)


@dataclass(frozen=True)
class Entry:
    """A registered pass or target: its name, the callable, its parameters and a one-line summary."""

    name: str
    obj: Any
    params: tuple[Param, ...]
    summary: str
    backoff: Backoff | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        choices = [p.name for p in self.params]
        raise SpecError(f"{self.name}: unknown parameter {name!r}{_suggest(name, choices)}; "
                        f"valid: {', '.join(choices) or '(none)'}")

    def bind(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Validate and convert raw spec values; returns the full parameter dict with defaults filled in."""
        values = {p.name: p.default for p in self.params}
        for key, value in raw.items():
            values[key] = convert(self.name, self.param(key), value)
        return values


PASSES: dict[str, Entry] = {}
TARGETS: dict[str, Entry] = {}


def register_pass(name: str, backoff: Backoff | None = None) -> Callable:
    """Register `fn(graph, ctx, *, ...)` as the pass called `name` (`backoff`: how the accuracy guard weakens it)."""
    def decorate(fn: Callable) -> Callable:
        _register(PASSES, "pass", name, fn, skip=2, backoff=backoff)
        return fn
    return decorate


def register_target(name: str) -> Callable:
    """Register a Target subclass (keyword-only typed `__init__` parameters) as the target called `name`."""
    def decorate(cls: type) -> type:
        cls.name = name
        _register(TARGETS, "target", name, cls, skip=0, signature_of=cls.__init__)
        return cls
    return decorate


def _register(table: dict[str, Entry], kind: str, name: str, obj: Any, skip: int, signature_of: Any = None,
              backoff: Backoff | None = None) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice")
    fn = signature_of or obj
    hints = typing.get_type_hints(fn, include_extras=True)
    params = []
    for p in list(inspect.signature(fn).parameters.values())[skip:]:
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.kind is not p.KEYWORD_ONLY:
            raise ValueError(f"{kind} {name!r}: parameter {p.name!r} must be keyword-only")
        if p.default is p.empty:
            raise ValueError(f"{kind} {name!r}: parameter {p.name!r} needs a default")
        hint = hints.get(p.name, type(p.default))
        base, help_text, bounds = hint, "", None
        if get_origin(hint) is typing.Annotated:
            base, *extras = get_args(hint)
            help_text = next((e for e in extras if isinstance(e, str)), "")
            bounds = next((e for e in extras if isinstance(e, Range)), None)
        params.append(Param(p.name, base, p.default, help_text, bounds))
    doc = inspect.getdoc(obj) or ""
    names = {p.name for p in params}
    if backoff is not None and (backoff.param not in names or (backoff.skip and backoff.skip not in names)):
        raise ValueError(f"{kind} {name!r}: backoff names a parameter the {kind} does not have")
    table[name] = Entry(name, obj, tuple(params), doc.splitlines()[0] if doc else "", backoff)


#: Named hooks: what the core needs from plug-ins beyond a pass or a target (the channel groups `squeeze inspect`
#: prints, `squeeze doctor`, a device runner for --rpc/--tracker, the goal's sensitivity tables), so that the core
#: never imports a pass or target module. Each hook has exactly one provider, registered by the module that
#: implements it with `@provides(name)`.
HOOKS: dict[str, Callable] = {}


def provides(name: str) -> Callable:
    """Register `fn` as the provider of the hook `name` (see HOOKS)."""
    def decorate(fn: Callable) -> Callable:
        if name in HOOKS and HOOKS[name] is not fn:
            raise ValueError(f"hook {name!r} has two providers: {HOOKS[name].__module__} and {fn.__module__}")
        HOOKS[name] = fn
        return fn
    return decorate


def hook(name: str) -> Callable:
    """The provider of the hook `name`, after loading the plug-ins."""
    _load_plugins()
    if name not in HOOKS:
        raise LookupError(f"no plug-in provides the hook {name!r}; known: {', '.join(sorted(HOOKS))}")
    return HOOKS[name]


def get_pass(name: str) -> Entry:
    return _lookup(PASSES, "pass", name)


def get_target(name: str) -> Entry:
    return _lookup(TARGETS, "target", name)


def _lookup(table: dict[str, Entry], kind: str, name: str) -> Entry:
    _load_plugins()
    if name not in table:
        raise SpecError(f"unknown {kind} {name!r}{_suggest(name, list(table))}; valid: {', '.join(sorted(table))}")
    return table[name]


def all_passes() -> dict[str, Entry]:
    _load_plugins()
    return dict(PASSES)


def all_targets() -> dict[str, Entry]:
    _load_plugins()
    return dict(TARGETS)


def _load_plugins() -> None:
    # Importing the packages runs their explicit module imports, which register everything.
    from . import passes  # noqa: F401
    from . import targets  # noqa: F401


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------- value conversion

def convert(owner: str, param: Param, value: Any) -> Any:
    """Convert a parsed spec value to the parameter's type, or raise SpecError naming the offender."""
    try:
        result = _convert(param.type, value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{owner}: parameter {param.name}={_show(value)}: {exc}") from None
    if param.range is not None and isinstance(result, (int, float)) and not isinstance(result, bool):
        if not param.range.contains(result):
            raise SpecError(f"{owner}: parameter {param.name}={_show(value)} is out of range; must be in {param.range}")
    return result


def _convert(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        return _convert(get_args(tp)[0], value)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"must be one of {', '.join(map(str, choices))}{hint}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_convert(item, v) for v in items]
    if origin is dict:
        key_t, val_t = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ValueError("expected a map like {name: value, ...}")
        return {_convert(key_t, k): _convert(val_t, v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (list, dict, tuple)):
            raise ValueError("expected a name or string")
        return str(value)
    raise TypeError(f"unsupported parameter type {tp!r}")


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + (
            " | none" if type(None) in get_args(tp) else "")
    if origin in (list, tuple):
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        k, v = get_args(tp)
        return f"map[{_type_name(k)}→{_type_name(v)}]"
    return getattr(tp, "__name__", str(tp))
