"""safeparse: JSON and YAML from untrusted bytes end in a value or one FormatError, never in
MemoryError, RecursionError or an unbounded parse."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.errors import FormatError, LimitExceededError, RecipeError
from modelpress.limits import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS, MAX_YAML_NODES
from modelpress.safeparse import json_depth, load_json, load_yaml


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs recipe: each level lists the previous one `width` times (~1 KB of text)."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_is_expanded():
    text = alias_bomb()
    assert len(text) < 1100
    with pytest.raises(LimitExceededError, match=f"expands to more than {MAX_YAML_NODES} nodes"):
        load_yaml(text, "recipe")


def test_aliases_that_expand_within_the_cap_still_load():
    assert load_yaml("a: &x [1, 2]\nb: *x\nc: {<<: {k: *x}}\n", "recipe") == {"a": [1, 2], "b": [1, 2], "c": {"k": [1, 2]}}
    small = load_yaml(alias_bomb(levels=3, width=3), "recipe")
    assert len(small["a3"]) == 3 and small["a3"][0][0][0] == ["x", "x", "x"]


def test_recursive_alias_is_refused():
    with pytest.raises(FormatError, match="recursive"):
        load_yaml("a: &a [1, *a]\n", "recipe")


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000, "{a: " * 10_000 + "1" + "}" * 10_000,
                                  "".join("  " * i + "- \n" for i in range(200))])
def test_deep_yaml_is_refused_before_the_composer_recurses(text):
    with pytest.raises(LimitExceededError, match=f"more than {MAX_JSON_DEPTH} levels"):
        load_yaml(text, "recipe")


@pytest.mark.parametrize("data", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deep_json_is_refused_before_the_decoder_recurses(data):
    with pytest.raises(LimitExceededError, match="100000 levels deep"):
        load_json(data, "manifest")


def test_nesting_up_to_the_cap_parses():
    depth = MAX_JSON_DEPTH
    assert load_json(b"[" * depth + b"]" * depth, "manifest") is not None
    assert load_yaml("[" * depth + "]" * depth, "recipe") is not None
    with pytest.raises(LimitExceededError):
        load_json(b"[" * (depth + 1) + b"]" * (depth + 1), "manifest")


@pytest.mark.parametrize("data, depth", [(b'{"a": "[[[[", "b": ["\\"]]]"]}', 2), (b"[]", 1), (b"1", 0),
                                          (b'[{"x": [1, {"y": []}]}]', 5)])
def test_json_depth_ignores_brackets_inside_strings(data, depth):
    assert json_depth(data) == depth


def test_oversized_documents_are_refused_before_parsing():
    with pytest.raises(LimitExceededError, match="more than the 100"):
        load_json(b"[" + b"0," * 100 + b"0]", "config.json", limit=100)
    with pytest.raises(LimitExceededError, match="more than the 10"):
        load_yaml("stages: [a, b, c, d]", "recipe", limit=10)


@pytest.mark.parametrize("digits", [MAX_NUMBER_DIGITS + 1, 5000, 100_000])
def test_huge_integers_are_refused(digits):
    with pytest.raises(FormatError, match=f"integer of {digits} digits"):
        load_json(b'{"n": ' + b"7" * digits + b"}", "manifest")
    with pytest.raises(FormatError, match=f"integer of {digits} digits"):
        load_yaml("n: " + "7" * digits, "recipe")


@pytest.mark.parametrize("data, message", [
    (b"[NaN]", "NaN is not a JSON number"),
    (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"a": 1, "a": 2}', "'a' appears twice"),
    (b'{"a": ', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"", "not valid JSON"),
])
def test_malformed_json_is_one_format_error(data, message):
    with pytest.raises(FormatError, match=message):
        load_json(data, "manifest")


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system [echo hi]", "not valid YAML"),
    ("a: [1\n", "not valid YAML"),
    ("--- 1\n--- 2\n", "not valid YAML"),
    ("? [a]\n: 1\n", "not valid YAML"),  # an unhashable key
    (b"\xff", "not UTF-8"),
])
def test_malformed_yaml_is_one_error_of_the_callers_type(text, message):
    with pytest.raises(RecipeError, match=message):
        load_yaml(text, "recipe", error=RecipeError)


def test_error_names_the_document_and_the_fix():
    with pytest.raises(FormatError) as info:
        load_json(b"{", "manifest '/m/modelpress.json'", hint="re-save the model")
    message = str(info.value)
    assert message.startswith("manifest '/m/modelpress.json' is not valid JSON") and message.endswith("re-save the model")
    assert "\n" not in message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**18), 10**18) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(json_values)
def test_valid_documents_parse_as_the_standard_parsers_do(value):
    text = json.dumps(value)
    assert load_json(text.encode(), "doc") == json.loads(text)
    assert load_yaml(text, "doc") == yaml.safe_load(text)  # the same value as the reference loader


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_value_or_a_format_error(data):
    for parse in (load_json, load_yaml):
        try:
            parse(data, "doc")
        except FormatError:
            pass
