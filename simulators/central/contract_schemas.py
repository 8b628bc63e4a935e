"""The contract's JSON Schemas, compiled for the fake central (and for tests).

An independent reading of ``gateway/contract/schemas/`` (imports nothing from ``gateway``):
``load_validators`` gives a jsonschema validator per schema file; ``contract_schemas``
compiles them once with fastjsonschema, specialised per event type, for the consumer's
hot path, and ``ContractSchemas.check`` raises ``Invalid`` with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import FunctionType
from typing import Any, cast

from simulators.deps import missing

try:
    import fastjsonschema
    from fastjsonschema import JsonSchemaDefinitionException, JsonSchemaValueException
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    from referencing import Registry, Resource
except ModuleNotFoundError as exc:
    raise missing(exc, "the fake central") from exc

# The contract's schemas: central/schemas is a symlink to gateway/contract/schemas, so a
# checkout and an installed touchpoint-simulators (whose wheel carries the files) read the same.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


class Invalid(Exception):
    """A message that breaks the contract; ``reason`` is the countable label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _read_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(schema_dir.glob("*.json"))
    }


def load_validators(schema_dir: Path = SCHEMA_DIR) -> dict[str, Draft202012Validator]:
    """One validator per schema file, keyed by file name, resolving ``$ref`` locally."""
    schemas = _read_schemas(schema_dir)
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    return {
        name: Draft202012Validator(schema, registry=registry) for name, schema in schemas.items()
    }


# -- fast validation -----------------------------------------------------------------------
#
# jsonschema walks the schema for every instance (~1,200 events/s); fastjsonschema compiles
# it to Python once.  fastjsonschema implements drafts 04-07 (2020-12 documents get its
# draft-2019 generator), so only keywords whose meaning it shares with draft 2020-12, as the
# contract uses them, are let through; anything else (``prefixItems``, ``unevaluated*``,
# ``dependent*``, ``format``, ...) would be silently ignored by it, so it fails loudly here.
# tests/simulators/test_central.py holds the compiled validators to jsonschema's verdicts.

_ASSERTIONS = frozenset(
    {
        "type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
        "minItems", "maxItems",
        "uniqueItems", "required", "properties", "additionalProperties", "items",
        "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
    }
)  # fmt: skip
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "$comment"})
_REF = re.compile(r"(?P<file>[a-z0-9-]+\.json)?(?P<pointer>#(/[^/#]+)*)?")

Check = Callable[[Any], Any]


def _check_supported(node: Any, where: str, files: set[str], *, root: bool = False) -> None:
    """Refuse a schema the compiled validator could read differently from draft 2020-12."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a schema must be an object or a boolean")
    unknown = set(node) - _ASSERTIONS - _ANNOTATIONS
    if unknown:
        raise ValueError(f"{where}: keywords {sorted(unknown)} are not supported by the fast path")
    if "$id" in node and not root:
        raise ValueError(f"{where}: $id below the root would move $ref resolution")
    if "$ref" in node:
        # draft 2020-12 applies a $ref's siblings too; fastjsonschema ignores them.
        if set(node) - _ANNOTATIONS != {"$ref"}:
            raise ValueError(f"{where}: $ref with sibling keywords")
        ref = _REF.fullmatch(node["$ref"])
        if ref is None or ref["file"] not in (None, *files):
            raise ValueError(f"{where}: $ref {node['$ref']!r} is not to a local schema file")
    if "items" in node and not isinstance(node["items"], dict | bool):
        raise ValueError(f"{where}: array-form items is not draft 2020-12")
    for key in ("properties", "$defs"):
        for name, child in node.get(key, {}).items():
            _check_supported(child, f"{where}/{key}/{name}", files)
    for key in ("allOf", "anyOf", "oneOf"):
        for index, child in enumerate(node.get(key, [])):
            _check_supported(child, f"{where}/{key}/{index}", files)
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if key in node:
            _check_supported(node[key], f"{where}/{key}", files)


def _inline(node: Any, file: str, schemas: dict[str, dict[str, Any]], depth: int = 0) -> Any:
    """``node`` (from schema ``file``) with every ``$ref`` replaced by what it points to.

    The compiled code then makes no call per reference.  _check_supported has made sure a
    ``$ref`` has no sibling assertions, points into a local file and no ``$id`` moves scope.
    """
    if depth > 64:
        raise ValueError(f"{file}: $ref nesting too deep (recursive schema?)")
    if isinstance(node, list):
        return [_inline(item, file, schemas, depth) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = _REF.fullmatch(node["$ref"])
        assert ref is not None  # checked by _check_supported
        target_file = ref["file"] or file
        target: Any = schemas[target_file]
        for part in (ref["pointer"] or "#").split("/")[1:]:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return _inline(target, target_file, schemas, depth + 1)
    inlined = {  # $defs only holds $ref targets, inlined by now; enum and const hold data
        key: value if key in ("enum", "const") else _inline(value, file, schemas, depth)
        for key, value in node.items()
        if key != "$defs"
    }
    return _drop_implied(inlined)


def _drop_implied(node: dict[str, Any]) -> dict[str, Any]:
    """Drop the assertions next to an ``enum`` that every one of its values already meets.

    An instance the enum accepts equals one of those values, so they can add nothing; the
    compiled code then skips them (for ``purposes``: type, items and uniqueItems).
    """
    if not isinstance(node.get("enum"), list):
        return node
    others = {key: value for key, value in node.items() if key in _ASSERTIONS - {"enum"}}
    if not others:
        return node
    implied = Draft202012Validator(others)
    if not all(implied.is_valid(value) for value in node["enum"]):
        return node
    return {key: value for key, value in node.items() if key not in others}


def _decide(condition: Any, event_type: str, has_subject: bool) -> bool | None:
    """Whether an ``if`` holds for any object with this ``type`` and ``subject`` presence.

    None when that depends on more of the instance; only the shapes event.json uses are
    decided: ``required`` of type/subject and ``properties: {type: {const: ...}}``.
    """
    if not isinstance(condition, dict) or set(condition) - {"required", "properties"}:
        return None
    holds = True
    for name in condition.get("required", []):
        if name == "subject":
            holds = holds and has_subject
        elif name != "type":  # present: the caller only asks about objects with a type
            return None
    properties = condition.get("properties", {})
    if set(properties) - {"type"}:
        return None
    if "type" in properties:
        if properties["type"].keys() != {"const"}:
            return None
        const = properties["type"]["const"]
        holds = holds and isinstance(const, str) and const == event_type
    return holds


def _specialise(node: dict[str, Any], event_type: str, has_subject: bool) -> dict[str, Any]:
    """``node`` with each decidable if/then/else replaced by the branch that applies.

    Sound because ``allOf`` is a conjunction: an ``if`` that holds adds its ``then``, one
    that fails adds its ``else``.  It spares the compiled code a raised exception per
    undecided ``if``, which is most of its time on an event (six type branches).
    """
    node = dict(node)
    if "allOf" in node:
        node["allOf"] = [
            _specialise(child, event_type, has_subject) if isinstance(child, dict) else child
            for child in node["allOf"]
        ]
    holds = _decide(node.get("if"), event_type, has_subject) if "if" in node else None
    if holds is not None:
        branch = node.pop("then", None) if holds else node.pop("else", None)
        node.pop("if")
        node.pop("then", None)
        node.pop("else", None)
        if branch is not None:
            node["allOf"] = [*node.get("allOf", []), branch]
    return node


class ContractSchemas:
    """Validate documents against the contract schemas: fast, with jsonschema's verdicts.

    The decision comes from fastjsonschema-compiled code; jsonschema only explains a
    rejection (``best_match``), which keeps the reasons as they always were.  Events are
    validated one by one with code specialised to their ``type`` and whether they carry a
    ``subject`` (compiled on first use), and a batch as its envelope plus its events.
    """

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self._schemas = _read_schemas(schema_dir)
        self.reference = load_validators(schema_dir)
        files = set(self._schemas)
        for name, schema in self._schemas.items():
            if schema.get("$id") != name:
                raise ValueError(f"{name}: $id must be the file name, so $refs resolve to files")
            _check_supported(schema, name, files, root=True)
        self._lock = threading.Lock()
        self._compiled: dict[str, Check] = {}
        self._events: dict[tuple[str, bool], Check] = {}
        event = self._schemas.get("event.json", {})
        type_enum = event.get("properties", {}).get("type", {}).get("enum", [])
        self._event_types = frozenset(t for t in type_enum if isinstance(t, str))
        # A batch is its envelope plus one event.json per item when that is all it says.
        batch = self._schemas.get("batch.json", {})
        self._split_batch = batch.get("properties", {}).get("events", {}).get("items") == {
            "$ref": "event.json"
        }

    def _compile(self, file: str, schema: dict[str, Any]) -> Check:
        def refuse(uri: str) -> Any:  # unreachable: no $ref is left after inlining
            raise JsonSchemaDefinitionException(f"unexpected $ref to {uri!r}")

        check = fastjsonschema.compile(
            _inline(schema, file, self._schemas),
            handlers={"": refuse},
            use_default=False,
            use_formats=False,
        )
        # fastjsonschema compiles patterns with "$" rewritten to \Z; jsonschema searches with
        # the pattern as written, where "$" also matches before a final newline.  Do the same.
        patterns: dict[str, re.Pattern[str]] = cast(FunctionType, check).__globals__[
            "REGEX_PATTERNS"
        ]
        for pattern in patterns:
            patterns[pattern] = re.compile(pattern)
        return check

    def _compiled_for(self, key: str, build: Callable[[], dict[str, Any]]) -> Check:
        check = self._compiled.get(key)
        if check is None:
            with self._lock:
                check = self._compiled.get(key) or self._compile(key.partition("#")[0], build())
                self._compiled[key] = check
        return check

    def _envelope(self) -> dict[str, Any]:
        envelope = copy.deepcopy(self._schemas["batch.json"])
        del envelope["properties"]["events"]["items"]
        return envelope

    def _check_event(self, event: Any) -> None:
        event_type = event.get("type") if isinstance(event, dict) else None
        if isinstance(event_type, str) and event_type in self._event_types:
            key = (event_type, "subject" in event)
            check = self._events.get(key)
            if check is None:
                schema = self._schemas["event.json"]
                check = self._compiled_for(f"event.json#{key}", lambda: _specialise(schema, *key))
                self._events[key] = check
            check(event)
        else:
            self._compiled_for("event.json", lambda: self._schemas["event.json"])(event)

    def _check_fast(self, name: str, doc: Any) -> None:
        if name == "event.json":
            self._check_event(doc)
        elif name == "batch.json" and self._split_batch:
            self._compiled_for("batch.json#envelope", self._envelope)(doc)
            for event in doc["events"]:
                self._check_event(event)
        else:
            self._compiled_for(name, lambda: self._schemas[name])(doc)

    def is_valid(self, name: str, doc: Any) -> bool:
        """The fast decision alone."""
        try:
            self._check_fast(name, doc)
        except JsonSchemaValueException:
            return False
        return True

    def check(self, name: str, doc: Any) -> None:
        """Raise Invalid("schema") unless ``doc`` is valid against schema file ``name``."""
        try:
            self._check_fast(name, doc)
        except JsonSchemaValueException as exc:
            error = best_match(self.reference[name].iter_errors(doc))
            if error is None:  # never seen: the tests hold both to the same verdicts
                raise Invalid("schema", f"{name}: {exc.message[:200]}") from None
            where = "/".join(str(part) for part in error.absolute_path) or "<top>"
            raise Invalid("schema", f"{name} at {where}: {error.message[:200]}") from None


_CACHE: dict[tuple[Path, tuple[tuple[str, str], ...]], ContractSchemas] = {}
_CACHE_LOCK = threading.Lock()


def contract_schemas(schema_dir: Path = SCHEMA_DIR) -> ContractSchemas:
    """A shared ContractSchemas per schema directory and content: compiling takes ~50 ms."""
    texts = tuple(
        (path.name, path.read_text(encoding="utf-8")) for path in sorted(schema_dir.glob("*.json"))
    )
    key = (schema_dir.resolve(), texts)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = ContractSchemas(schema_dir)
        return _CACHE[key]
