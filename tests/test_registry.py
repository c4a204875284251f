"""Pass and target registries: the signature is the schema; duplicates and bad signatures are refused;
`squeeze passes` / `squeeze targets` print every parameter with its type, default and help."""
from __future__ import annotations

from typing import Annotated, Literal

import pytest

from squeeze import cli
from squeeze.errors import SpecError
from squeeze.registry import (PASSES, TARGETS, Range, all_passes, all_targets, get_pass, get_target,
                              register_pass, register_target)
from squeeze.targets.base import Target


def test_builtin_passes_and_targets_are_registered():
    assert {"cleanup", "fold-bn"} <= set(all_passes())
    assert "cpu" in all_targets()
    assert get_pass("cleanup").obj.__name__ == "cleanup"
    assert get_target("cpu").obj.name == "cpu"


def test_duplicate_pass_name_raises_and_keeps_the_first():
    first = get_pass("cleanup").obj

    def impostor(graph, ctx) -> None:
        """Not the real cleanup."""

    with pytest.raises(ValueError, match="pass 'cleanup' is registered twice"):
        register_pass("cleanup")(impostor)
    assert PASSES["cleanup"].obj is first


def test_duplicate_target_name_raises_and_keeps_the_first():
    first = get_target("cpu").obj

    class Impostor(Target):
        def tvm_target(self): ...
        def build(self, model, shapes, workdir): ...
        def measure(self, artifact, samples, runs): ...

    with pytest.raises(ValueError, match="target 'cpu' is registered twice"):
        register_target("cpu")(Impostor)
    assert TARGETS["cpu"].obj is first


def test_parameters_must_be_keyword_only_with_defaults():
    def positional(graph, ctx, ratio: float = 0.5) -> None: ...

    def no_default(graph, ctx, *, ratio: float) -> None: ...

    with pytest.raises(ValueError, match="parameter 'ratio' must be keyword-only"):
        register_pass("test-registry-positional")(positional)
    with pytest.raises(ValueError, match="parameter 'ratio' needs a default"):
        register_pass("test-registry-no-default")(no_default)
    assert "test-registry-positional" not in PASSES and "test-registry-no-default" not in PASSES


def test_signature_becomes_the_schema():
    entry = get_pass("cleanup")
    assert entry.summary == "Fold constants, drop Identity and inference-mode Dropout, remove dead nodes (lossless)."
    assert [(p.name, p.type, p.default) for p in entry.params] == [("fold_constants", bool, True),
                                                                   ("max_folded_mb", float, 16.0)]
    assert entry.params[1].range == Range(0, None)
    assert all(p.help for p in entry.params)
    assert get_pass("fold-bn").params == ()
    assert [(p.name, p.type_name, p.default) for p in get_target("cpu").params][0] == ("mcpu", "str", "host")


def test_type_names(temp_pass):
    @temp_pass("test-registry-types")
    def types(graph, ctx, *, a: Literal["l1", "fpgm"] = "l1", b: list[int] | None = None,
              c: dict[str, float] | None = None, d: int | None = None, e: Annotated[float, "help"] = 1.0) -> None:
        """Types."""
    names = {p.name: p.type_name for p in get_pass("test-registry-types").params}
    assert names == {"a": "{l1,fpgm}", "b": "list[int] | none", "c": "map[str→float] | none", "d": "int | none",
                     "e": "float"}


@pytest.mark.parametrize("bounds, inside, outside, text", [
    (Range(0.0, 1.0), [0.0, 0.5, 1.0], [-0.01, 1.01], "[0, 1]"),
    (Range(0.0, 1.0, hi_open=True), [0.0, 0.999], [1.0], "[0, 1)"),
    (Range(0.0, 1.0, lo_open=True), [1e-9, 1.0], [0.0], "(0, 1]"),
    (Range(2, None), [2, 10**9], [1], "[2, inf)"),
    (Range(None, 8), [-10**9, 8], [9], "(-inf, 8]"),
])
def test_range(bounds, inside, outside, text):
    assert all(bounds.contains(v) for v in inside)
    assert not any(bounds.contains(v) for v in outside)
    assert str(bounds) == text


def test_lookup_of_unknown_names_is_a_spec_error():
    with pytest.raises(SpecError, match=r"^unknown pass 'fold_bn' \(did you mean 'fold-bn'\?\); valid: "):
        get_pass("fold_bn")
    with pytest.raises(SpecError, match=r"^unknown target 'cpux' \(did you mean 'cpu'\?\); valid: .*\bcpu\b"):
        get_target("cpux")


def _listing(capsys, command: str) -> list[str]:
    assert cli.main([command]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out.splitlines()


def _check_listing(lines: list[str], entries) -> None:
    """Every entry has a `name: summary` line followed by one indented line per parameter."""
    for entry in entries.values():
        header = f"{entry.name}: {entry.summary}"
        assert header in lines, f"{entry.name} missing from the listing"
        assert entry.summary, f"{entry.name} has no docstring summary"
        start = lines.index(header) + 1
        param_lines = lines[start:start + len(entry.params)]
        for p, line in zip(entry.params, param_lines):
            default = str(p.default).lower() if isinstance(p.default, bool) else str(p.default)
            assert line.startswith(f"    {p.name}: {p.type_name}"), line
            assert f" = {default}" in line, line
            assert p.help, f"{entry.name}: parameter {p.name} has no help text"
            assert line.endswith(f"  — {p.help}"), line
            if p.range:
                assert f" in {p.range} = " in line, line


def test_squeeze_passes_lists_every_parameter(capsys, temp_pass):
    @temp_pass("test-registry-listing")
    def listing(graph, ctx, *, ratio: Annotated[float, Range(0, 1, hi_open=True), "fraction to remove"] = 0.3,
                exact: Annotated[bool, "be exact"] = False) -> None:
        """Listed for the test."""
    lines = _listing(capsys, "passes")
    _check_listing(lines, all_passes())
    assert "    ratio: float in [0, 1) = 0.3  — fraction to remove" in lines
    assert "    exact: bool = false  — be exact" in lines
    assert "    max_folded_mb: float in [0, inf) = 16.0  — do not fold results larger than this (MB)" in lines
    names = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert names == sorted(names)


def test_squeeze_targets_lists_every_parameter(capsys):
    lines = _listing(capsys, "targets")
    _check_listing(lines, all_targets())
    assert "    mcpu: str = host  — LLVM CPU name; 'host' asks LLVM for this machine's" in lines
