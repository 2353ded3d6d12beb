"""JSON and YAML from untrusted bytes, with every cap checked before the parser can blow up.

Every manifest, config.json, sentence-transformers JSON file and recipe modelpress reads is parsed
here. A hostile document may be large, deeply nested (the parsers recurse once per level, so
100,000 levels end in RecursionError), hold numbers of thousands of digits (ValueError), or, in
YAML, expand aliases into an exponential tree (nine levels of `&a [*a, *a, ...]` in 1 KB is a
billion nodes). So, before anything is built:

- the size is checked against a byte cap;
- the nesting depth is measured without recursion (JSON: brackets outside strings; YAML: the
  parser's event stream, which is iterative) and capped at `MAX_JSON_DEPTH`;
- YAML: the node graph is composed (aliases are shared references then, not copies), its size with
  every alias expanded is counted and capped at `MAX_YAML_NODES`, and recursive aliases are refused;
  only then are Python objects constructed, by the safe constructor (no Python tags);
- integers longer than `MAX_NUMBER_DIGITS` digits are refused (Python's own limit raises a ValueError
  at 4300); in JSON so are NaN/Infinity (not JSON) and duplicate keys.

Every failure is one `FormatError` (or the caller's subclass, e.g. RecipeError) naming the document.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import yaml

from modelpress.errors import FormatError, LimitExceededError, ModelpressError
from modelpress.limits import MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_NUMBER_DIGITS, MAX_RECIPE_BYTES, MAX_YAML_NODES

__all__ = ["load_json", "load_yaml", "json_depth"]

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")
_YAML_INT = "tag:yaml.org,2002:int"


class _Refused(ValueError):
    """Raised inside the JSON decoder's hooks; becomes the caller's error."""


def _fail(error: type[ModelpressError], what: str, reason: str, hint: str) -> ModelpressError:
    return error(f"{what} is not valid: {reason}" + (f"; {hint}" if hint else ""))


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without recursion."""
    brackets = b"".join(_JSON_BRACKETS.findall(_JSON_STRING.sub(b"", data)))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def load_json(data: bytes | str, what: str, limit: int = MAX_JSON_BYTES, hint: str = "",
              error: type[ModelpressError] = FormatError) -> Any:
    """The value of a JSON document of at most `limit` bytes (UTF-8), nested at most MAX_JSON_DEPTH deep.

    `what` names the document in the error ("manifest '/x/modelpress.json'"), `hint` says what to do.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > limit:
        raise LimitExceededError(f"{what} is {len(raw)} bytes, more than the {limit} a valid one can be"
                                 + (f"; {hint}" if hint else ""))
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise LimitExceededError(f"{what} nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed"
                                 + (f"; {hint}" if hint else ""))
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant,
                          object_pairs_hook=_unique_object)
    except UnicodeDecodeError:
        raise _fail(error, what, "it is not UTF-8 text", hint) from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                    + (f"; {hint}" if hint else "")) from None
    except (_Refused, RecursionError, ValueError) as exc:
        raise _fail(error, what, str(exc) or type(exc).__name__, hint) from None


def _yaml_depth_and_events(text: str, what: str, hint: str) -> None:
    """Walk the parser's events (iterative) and refuse deep nesting or too many events before composing."""
    depth = events = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        events += 1
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise LimitExceededError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep"
                                         + (f"; {hint}" if hint else ""))
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        if events > MAX_YAML_NODES:
            raise LimitExceededError(f"{what} has more than {MAX_YAML_NODES} nodes" + (f"; {hint}" if hint else ""))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _expanded_nodes(root: yaml.Node, cap: int) -> int:
    """How many nodes the graph under `root` has with every alias expanded (a shared node counts once
    per reference), counted iteratively with memoisation; stops early past `cap`.
    Raises _Refused for a recursive alias (a node that contains itself)."""
    total: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total[key] = 1 + sum(total[id(child)] for child in _children(node))
            if total[key] > cap:
                return total[key]
            continue
        if key in total:
            continue
        if key in on_path:
            raise _Refused("an alias refers to a node that contains it (a recursive structure)")
        if node.tag == _YAML_INT and len(str(node.value)) > MAX_NUMBER_DIGITS:
            raise _Refused(f"an integer of {len(str(node.value))} digits (at most {MAX_NUMBER_DIGITS})")
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise _Refused("an alias refers to a node that contains it (a recursive structure)")
            if id(child) not in total:
                stack.append((child, False))
    return total[id(root)]


def load_yaml(text: str | bytes, what: str, limit: int = MAX_RECIPE_BYTES, hint: str = "",
              error: type[ModelpressError] = FormatError) -> Any:
    """The value of a single YAML document (safe tags only), with size, depth and expanded-node caps."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limit:
        raise LimitExceededError(f"{what} is {size} bytes, more than the {limit} a valid one can be"
                                 + (f"; {hint}" if hint else ""))
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        _yaml_depth_and_events(text, what, hint)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            nodes = _expanded_nodes(node, MAX_YAML_NODES)
            if nodes > MAX_YAML_NODES:
                raise LimitExceededError(f"{what} expands to more than {MAX_YAML_NODES} nodes through its aliases"
                                         + (f"; {hint}" if hint else ""))
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise _fail(error, what, "it is not UTF-8 text", hint) from None
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML: {' '.join(str(exc).split())[:200]}" + (f"; {hint}" if hint else "")) from None
    except (_Refused, RecursionError, ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise _fail(error, what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, hint) from None
