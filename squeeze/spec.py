"""The pass/target spec grammar: `prune(ratio=0.5,criterion=fpgm),quant,codebook(bits=4)`.

Comma-separated calls, each a name with an optional parenthesised `key=value` list. Values are Python-like
literals (numbers, true/false, quoted strings, [lists], {maps}); a bare word is a string (`criterion=fpgm`).
Names may contain hyphens (`fold-bn`). Parsing uses Python's `ast`; binding and type checks use the registry.
"""
from __future__ import annotations

import ast
import keyword
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError
from .registry import Entry

_HYPHEN = "__hy__"
_HYPHEN_IN_NAME = re.compile(r"(?<=[A-Za-z0-9_])-(?=[A-Za-z_])")
# A bare value that is a Python keyword (`scope=global`) is quoted before parsing (True/False/None stay literals).
_KEYWORD_VALUE = re.compile(r"(=\s*)(" + "|".join(k for k in keyword.kwlist if k not in ("True", "False", "None"))
                            + r")(?=\s*[,)\]}]|\s*$)")
_QUOTED = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


@dataclass
class Call:
    """One parsed, bound element of a spec: the registry entry and its full parameter dict."""

    entry: Entry
    params: dict[str, Any] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    def __str__(self) -> str:
        if not self.given:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in self.given.items()) + ")"


def parse(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a spec into (name, raw params) pairs without looking anything up."""
    spec = (spec or "").strip()
    if not spec:
        return []
    # Hyphens in bare words become a placeholder Python accepts in names; quoted strings are left as they are.
    source = "".join(part if i % 2 else _KEYWORD_VALUE.sub(r"\1'\2'", _HYPHEN_IN_NAME.sub(_HYPHEN, part))
                     for i, part in enumerate(_QUOTED.split(spec)))
    try:
        tree = ast.parse(f"({source},)", mode="eval").body
    except SyntaxError:
        raise SpecError(f"cannot parse spec {spec!r}: expected name or name(key=value,...), comma-separated") from None
    assert isinstance(tree, ast.Tuple)
    items = []
    for node in tree.elts:
        if isinstance(node, ast.Name):
            items.append((_name(node.id), {}))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.args:
                raise SpecError(f"{_name(node.func.id)}: parameters must be given as key=value "
                                f"(got a positional value in {spec!r})")
            params: dict[str, Any] = {}
            for kw in node.keywords:
                if kw.arg is None:
                    raise SpecError(f"{_name(node.func.id)}: '**' is not allowed in a spec")
                if kw.arg in params:
                    raise SpecError(f"{_name(node.func.id)}: parameter {kw.arg!r} given twice")
                params[_name(kw.arg)] = _value(kw.value, spec)
            items.append((_name(node.func.id), params))
        else:
            raise SpecError(f"cannot parse spec {spec!r}: expected name or name(key=value,...), comma-separated")
    return items


def bind(spec: str, lookup) -> list[Call]:
    """Parse `spec` and bind each element with `lookup(name) -> Entry` (get_pass or get_target)."""
    calls = []
    for name, raw in parse(spec):
        entry: Entry = lookup(name)
        calls.append(Call(entry, entry.bind(raw), raw))
    return calls


def _value(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Name):
        low = node.id.lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "none":
            return None
        return _name(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, spec) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k, spec): _value(v, spec) for k, v in zip(node.keys, node.values)}
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise SpecError(f"cannot parse value {ast.unparse(node).replace(_HYPHEN, '-')!r} in {spec!r}") from None


def _name(text: str) -> str:
    return text.replace(_HYPHEN, "-")


_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(-[A-Za-z_][A-Za-z0-9_]*)*")


def _fmt(value: Any) -> str:
    """A spec literal that parses back to `value` (strings are quoted unless they read back as a bare word)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, str):
        bare = _BARE_WORD.fullmatch(value) and value.lower() not in ("true", "false", "none") \
            and not keyword.iskeyword(value)
        return value if bare else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_fmt(k)}:{_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value)
