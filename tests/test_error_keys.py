"""Messages name real params keys: every dotted key in a string of src/cadalign exists.

A message that tells the user to "lower train.batch_size" when the key is
``train.optim.batch_size`` sends them to edit a key that the config loader then refuses.
The test walks every string literal of the package (docstrings aside: they name modules, not
keys), takes each dotted path whose first part is a top-level section of params.yaml, and
looks it up in the composed parameters of every preset (conf/preset), the toy pipeline's
params.yaml, and the frozen dataclasses the stages load with ``cadalign.config.load_section``
(which hold keys with a default that no params file writes).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cadalign.config import SECTIONS, read_params
from cadalign.presets import compose, preset_names

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cadalign"
ANY = "*"  # a segment that stands for any name: a placeholder in a message, a mapping's key in a tree
LEAF: dict[str, Any] = {}  # a value with no keys under it

# a section, then dotted names; f-string fields ({...}) and <placeholders> stand for any name
KEY_RE = re.compile(r"(?<![\w./\-])(?:" + "|".join(SECTIONS) + r")(?:\.(?:[A-Za-z_]\w*|<[^>]*>|\{\}))+")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal but docstrings; an f-string with ``{}`` per field."""
    skip = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def message_keys(text: str) -> list[str]:
    """The params keys a string names (``train.optim.batch_size``; ``cities.{}.source``)."""
    return [re.sub(r"<[^>]*>|\{\}", ANY, m.group(0)) for m in KEY_RE.finditer(text)]


def _tree_of_params(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        return LEAF
    return {str(k): _tree_of_params(v) for k, v in data.items()}


def _tree_of_type(tp: Any) -> dict[str, Any]:
    """The keys a params value of annotated type ``tp`` may hold."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: _tree_of_type(hints[f.name]) for f in dataclasses.fields(tp)}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        merged: dict[str, Any] = {}
        for arg in args:
            merged.update(_tree_of_type(arg))
        return merged
    if origin is dict:
        return {ANY: _tree_of_type(args[1]) if args else LEAF}
    return LEAF


def _loaded_sections() -> Iterator[tuple[str, type]]:
    """(section path, dataclass) of every ``load_section(path, "<section>", Class)`` call."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module = None
        for node in ast.walk(tree):
            call = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_section"
            if not (call and len(node.args) == 3):
                continue
            section, cls = node.args[1], node.args[2]
            if isinstance(section, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else ANY for v in section.values)
            elif isinstance(section, ast.Constant):
                text = section.value
            else:
                continue
            if module is None:
                name = ".".join(("cadalign", *path.relative_to(SRC).with_suffix("").parts))
                module = importlib.import_module(name)
            yield text, eval(ast.unparse(cls), vars(module))  # a name or attribute of that module


def known_trees() -> list[dict[str, Any]]:
    """Every key some params file or config dataclass has, as nested dicts (one per source)."""
    trees = [_tree_of_params(compose(REPO / "conf", name)) for name in preset_names(REPO / "conf")]
    trees.append(_tree_of_params(read_params(REPO / "pipelines" / "toy" / "params.yaml")))
    for section, cls in _loaded_sections():
        tree = _tree_of_type(cls)
        for part in reversed(section.split(".")):
            tree = {part: tree}
        trees.append(tree)
    return trees


def key_exists(key: str, trees: list[dict[str, Any]]) -> bool:
    """Whether dotted ``key`` leads through one of ``trees`` (``*`` matching any name)."""

    def walk(tree: dict[str, Any], parts: list[str]) -> bool:
        if not parts:
            return True
        head, rest = parts[0], parts[1:]
        if head == ANY:
            return any(walk(sub, rest) for sub in tree.values())
        return any(walk(tree[k], rest) for k in (head, ANY) if k in tree)

    return any(walk(tree, key.split(".")) for tree in trees)


def named_keys() -> list[tuple[str, int, str]]:
    """(file, line, key) of every params key in a string of the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for line, text in _strings(ast.parse(path.read_text())):
            found += [(str(path.relative_to(REPO)), line, key) for key in message_keys(text)]
    return found


@pytest.fixture(scope="module")
def trees() -> list[dict[str, Any]]:
    return known_trees()


def test_every_key_a_message_names_exists(trees: list[dict[str, Any]]) -> None:
    keys = named_keys()
    assert len(keys) > 40  # the scan finds the messages (there are dozens)
    wrong = [f"{path}:{line}: {key}" for path, line, key in keys if not key_exists(key, trees)]
    assert wrong == [], "messages name keys that no preset or config dataclass has:\n" + "\n".join(wrong)


def test_the_scan_finds_keys_in_messages_and_f_strings() -> None:
    tree = ast.parse(
        '"""A docstring naming train.nothing."""\n'
        'x = f"lower train.optim.batch_size={b} or cities.{name}.tiles"\n'
        'y = "see cadalign.train.optim and https://project.inria.fr/x; realign.window.output_size."\n'
    )
    found = [key for _, text in _strings(tree) for key in message_keys(text)]
    assert found == ["train.optim.batch_size", "cities.*.tiles", "realign.window.output_size"]


@pytest.mark.parametrize(
    ("key", "exists"),
    [
        ("train.optim.batch_size", True),
        ("train.batch_size", False),  # the key is train.optim.batch_size
        ("train.lr", False),
        ("train.optim.lr", True),
        ("train.optim.device", True),  # a dataclass field no params file writes
        ("train.round_factors.*", True),
        ("train.round_factors.round7", True),  # a mapping's key may be any name
        ("cities.*.source", True),
        ("cities.*.nope", False),
        ("rounds.*", True),
        ("similarity.taus", True),
        ("toy.steps", True),
        ("train.optim.batch_size.more", False),  # under a value
    ],
)
def test_key_lookup(trees: list[dict[str, Any]], key: str, exists: bool) -> None:
    assert key_exists(key, trees) is exists
