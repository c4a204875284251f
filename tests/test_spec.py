"""The --passes/--target grammar: parsing, binding against the registries, and one-line SpecErrors."""
from __future__ import annotations

from typing import Annotated, Literal

import pytest

from squeeze.errors import SpecError
from squeeze.registry import Range, all_passes, all_targets, get_pass, get_target
from squeeze.spec import bind, parse

KITCHEN = "test-spec-kitchen-sink"


@pytest.fixture
def kitchen(temp_pass):
    """A pass with one parameter of every supported kind, registered for the test only."""
    @temp_pass(KITCHEN)
    def kitchen_sink(graph, ctx, *,
                     ratio: Annotated[float, Range(0.0, 1.0, hi_open=True), "fraction to remove"] = 0.3,
                     criterion: Annotated[Literal["l1", "l2", "fpgm"], "importance"] = "l1",
                     bits: Annotated[int, Range(2, 8), "bits per weight"] = 8,
                     per_channel: Annotated[bool, "one scale per channel"] = True,
                     name: Annotated[str, "a name"] = "x",
                     layers: Annotated[list[str] | None, "layer names"] = None,
                     overrides: Annotated[dict[str, int] | None, "per-layer bits"] = None,
                     limit: Annotated[int | None, "optional cap"] = None) -> None:
        """A pass that takes every kind of parameter."""
    return KITCHEN


def one_line_error(spec: str, lookup=get_pass) -> str:
    with pytest.raises(SpecError) as info:
        bind(spec, lookup)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ------------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("spec, expected", [
    ("prune(ratio=0.5,criterion=fpgm),quant,codebook(bits=4)",
     [("prune", {"ratio": 0.5, "criterion": "fpgm"}), ("quant", {}), ("codebook", {"bits": 4})]),
    ("", []),
    ("   ", []),
    ("fold-bn", [("fold-bn", {})]),
    ("fold-bn(),my-long-pass-name(key_a=1)", [("fold-bn", {}), ("my-long-pass-name", {"key_a": 1})]),
    ("  cleanup ,  fold-bn ( ) ", [("cleanup", {}), ("fold-bn", {})]),
    ("p(a=true,b=False,c=TRUE,d=none,e=None)", [("p", {"a": True, "b": False, "c": True, "d": None, "e": None})]),
    ("p(c=l1-norm,d=fpgm,e=_x9)", [("p", {"c": "l1-norm", "d": "fpgm", "e": "_x9"})]),
    ("p(s='a,b(c)',t=\"x y\",u='a-b',v='true')", [("p", {"s": "a,b(c)", "t": "x y", "u": "a-b", "v": "true"})]),
    ("p(l=[1,2,3],m=[a,b-c,'d e'],e=[],t=(1,2))", [("p", {"l": [1, 2, 3], "m": ["a", "b-c", "d e"], "e": [], "t": [1, 2]})]),
    ("p(m={conv1: 4, 'head/fc-1': [8, 2], x: {y: z}})", [("p", {"m": {"conv1": 4, "head/fc-1": [8, 2], "x": {"y": "z"}}})]),
    ("a,b,a", [("a", {}), ("b", {}), ("a", {})]),
])
def test_parse(spec, expected):
    assert parse(spec) == expected


def test_numbers_keep_their_type():
    (_, params), = parse("p(i=3,n=-2,f=0.25,g=.5,e=1e-3,E=2E+2,neg=-0.5)")
    assert params == {"i": 3, "n": -2, "f": 0.25, "g": 0.5, "e": 0.001, "E": 200.0, "neg": -0.5}
    assert [type(params[k]) for k in ("i", "n", "f", "e")] == [int, int, float, float]


@pytest.mark.parametrize("spec, offender", [
    ("cleanup(", "cleanup("),
    ("cleanup)", "cleanup)"),
    ("cleanup fold-bn", "cleanup fold-bn"),
    ("cleanup,,fold-bn", "cleanup,,fold-bn"),
    ("cleanup(fold_constants=)", "cleanup(fold_constants=)"),
    ("cleanup(=1)", "cleanup(=1)"),
    ("cleanup.x", "cleanup.x"),
    ("cleanup[0]", "cleanup[0]"),
    ("3", "'3'"),
    ("'cleanup'", "'cleanup'"),
    ("cleanup(x='unterminated)", "unterminated"),
    ("cleanup(x=foo())", "'foo()'"),
    ("cleanup(x=a.b)", "'a.b'"),
    ("cleanup(x=1+2)", "'1 + 2'"),
    ("cleanup(x=[a, f(1)])", "'f(1)'"),
])
def test_syntax_errors_are_one_line_and_quote_the_offender(spec, offender):
    message = one_line_error(spec)
    assert offender in message
    assert "cannot parse" in message


def test_positional_value_is_refused():
    message = one_line_error("cleanup(true)")
    assert message.startswith("cleanup: parameters must be given as key=value")
    assert "positional" in message


def test_repeated_parameter_is_refused():
    message = one_line_error("cleanup(fold_constants=true,fold_constants=false)")
    assert "'fold_constants' given twice" in message


def test_double_star_is_refused():
    assert "'**'" in one_line_error("cleanup(**{})")


# ------------------------------------------------------------------------------------------------- binding

def test_bind_fills_defaults(kitchen):
    (call,) = bind(kitchen, get_pass)
    assert call.name == KITCHEN
    assert call.params == {"ratio": 0.3, "criterion": "l1", "bits": 8, "per_channel": True, "name": "x",
                           "layers": None, "overrides": None, "limit": None}
    assert call.given == {}
    assert str(call) == KITCHEN


@pytest.mark.parametrize("text, key, value", [
    ("ratio=0", "ratio", 0.0),
    ("ratio=0.999", "ratio", 0.999),
    ("criterion=fpgm", "criterion", "fpgm"),
    ("criterion='l2'", "criterion", "l2"),
    ("bits=2", "bits", 2),
    ("bits=8", "bits", 8),
    ("per_channel=false", "per_channel", False),
    ("per_channel=no", "per_channel", False),
    ("per_channel=0", "per_channel", False),
    ("per_channel=on", "per_channel", True),
    ("name=stem-conv", "name", "stem-conv"),
    ("name=7", "name", "7"),
    ("layers=conv1", "layers", ["conv1"]),
    ("layers=[conv1,'head/fc']", "layers", ["conv1", "head/fc"]),
    ("overrides={conv1: 4, 'fc-2': 2}", "overrides", {"conv1": 4, "fc-2": 2}),
    ("limit=none", "limit", None),
    ("limit=5", "limit", 5),
])
def test_bind_converts_values(kitchen, text, key, value):
    (call,) = bind(f"{kitchen}({text})", get_pass)
    assert call.params[key] == value
    assert type(call.params[key]) is type(value)


@pytest.mark.parametrize("text, expected", [
    ("ratio=abc", "ratio=abc: expected a number"),
    ("ratio=[0.5]", "ratio=[0.5]: expected a number"),
    ("bits=4.5", "bits=4.5: expected an integer"),
    ("bits=true", "bits=True: expected an integer"),
    ("per_channel=maybe", "per_channel=maybe: expected true or false"),
    ("per_channel=2", "per_channel=2: expected true or false"),
    ("criterion=fpg", "criterion=fpg: must be one of l1, l2, fpgm (did you mean 'fpgm'?)"),
    ("name=[1]", "name=[1]: expected a name or string"),
    ("overrides=3", "overrides=3: expected a map like {name: value, ...}"),
    ("overrides={conv1: x}", "overrides={'conv1': 'x'}: expected an integer"),
    ("layers=[a,[b]]", "layers=['a', ['b']]: expected a name or string"),
])
def test_wrong_type_names_pass_parameter_and_value(kitchen, text, expected):
    message = one_line_error(f"{kitchen}({text})")
    assert message == f"{kitchen}: parameter {expected}"


@pytest.mark.parametrize("text, bounds", [
    ("ratio=1.0", "[0, 1)"),
    ("ratio=1", "[0, 1)"),
    ("ratio=-0.1", "[0, 1)"),
    ("bits=1", "[2, 8]"),
    ("bits=9", "[2, 8]"),
])
def test_out_of_range_names_the_bounds(kitchen, text, bounds):
    message = one_line_error(f"{kitchen}({text})")
    assert message == f"{kitchen}: parameter {text} is out of range; must be in {bounds}"


def test_unknown_parameter_suggests_the_closest_and_lists_all(kitchen):
    message = one_line_error(f"{kitchen}(ratoi=0.5)")
    assert message == (f"{kitchen}: unknown parameter 'ratoi' (did you mean 'ratio'?); valid: ratio, criterion, bits, "
                       "per_channel, name, layers, overrides, limit")
    assert "did you mean" not in one_line_error(f"{kitchen}(zzzzzz=1)")


def test_unknown_pass_suggests_the_closest_name():
    message = one_line_error("clenup")
    assert message.startswith("unknown pass 'clenup' (did you mean 'cleanup'?); valid: ")
    assert "cleanup" in message.split("valid: ")[1].split(", ")
    assert "fold-bn" in message.split("valid: ")[1].split(", ")
    assert one_line_error("fold-nb").startswith("unknown pass 'fold-nb' (did you mean 'fold-bn'?)")
    message = one_line_error("nosuchpass")
    assert message == "unknown pass 'nosuchpass'; valid: " + ", ".join(sorted(all_passes()))


def test_unknown_pass_anywhere_in_the_list_is_named():
    assert one_line_error("cleanup,fold-bn,qaunt(bits=4)").startswith("unknown pass 'qaunt'")


def test_real_passes_bind():
    calls = bind("cleanup(fold_constants=false,max_folded_mb=0),fold-bn", get_pass)
    assert [c.name for c in calls] == ["cleanup", "fold-bn"]
    assert calls[0].params == {"fold_constants": False, "max_folded_mb": 0.0}
    assert calls[1].params == {}
    assert "max_folded_mb=-1 is out of range; must be in [0, inf)" in one_line_error("cleanup(max_folded_mb=-1)")
    assert one_line_error("fold-bn(x=1)") == "fold-bn: unknown parameter 'x'; valid: (none)"


def test_targets_bind_with_the_same_grammar():
    (call,) = bind("cpu", get_target)
    assert call.name == "cpu" and call.params["mcpu"] == "host" and call.given == {}
    (call,) = bind("cpu(mcpu=znver4)", get_target)
    assert call.params["mcpu"] == "znver4" and str(call) == "cpu(mcpu=znver4)"
    message = one_line_error("cpux", get_target)
    assert message.startswith("unknown target 'cpux' (did you mean 'cpu'?); valid: ")
    assert message.split("valid: ")[1].split(", ") == sorted(all_targets())
    assert one_line_error("cpu(mpcu=x)", get_target).startswith("cpu: unknown parameter 'mpcu' (did you mean 'mcpu'?)")


@pytest.mark.parametrize("given", [
    "ratio=0.5,criterion=fpgm",
    "layers=[a,'b c','d,e',stem-conv]",
    "name='true'",
    "name='if'",
    "name='a-1'",
    "overrides={conv1:4,'head/fc':2}",
    "limit=none,per_channel=false",
])
def test_str_of_a_call_parses_back_to_the_same_call(kitchen, given):
    (call,) = bind(f"{kitchen}({given})", get_pass)
    (again,) = bind(str(call), get_pass)
    assert again.params == call.params
    assert again.given == call.given
