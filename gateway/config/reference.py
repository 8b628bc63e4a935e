"""The configuration reference: every key of ``gateway.toml``, generated from the JSON
Schema of the config models (``touchpoint-gateway config-schema --reference FILE``).

One table per TOML table (``[mqtt]``, ``[mqtt.tls]``, one per ``[[sources]]`` kind):
key, type, default (or *required*), and the description the model gives it.  A test
keeps ``firmware-config/CONFIG-REFERENCE.md`` equal to what this writes, and every key
described.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

HEADER = """\
# Configuration reference

Every key of `gateway.toml`, generated from the config models' JSON Schema
(`firmware-config/gateway.schema.json`) by
`touchpoint-gateway config-schema --reference firmware-config/CONFIG-REFERENCE.md`;
`tests/gateway/config/test_config_reference.py` keeps it current. The annotated example is
`gateway.example.toml`. Relative paths are resolved against the config file's folder;
`${CREDENTIALS_DIRECTORY}/NAME` names a systemd credential. Unknown keys are refused.
"""


def _ref_name(node: Mapping[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _type(node: Mapping[str, Any], defs: Mapping[str, Any]) -> str:  # noqa: PLR0911 - a case each
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"])
    name = _ref_name(node)
    if name is not None:
        target = defs.get(name, {})
        return "table" if target.get("type") == "object" else _type(target, defs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            kinds = [_type(n, defs) for n in node[key]]
            return " | ".join(dict.fromkeys(k for k in kinds if k != "null")) + (
                " (or absent)" if "null" in kinds else ""
            )
    kind = node.get("type")
    if kind == "array":
        items = node.get("items", {})
        if "prefixItems" in node:
            return "list of " + ", ".join(_type(n, defs) for n in node["prefixItems"])
        return f"list of {_type(items, defs)}" if items else "list"
    if kind == "object":
        extra = node.get("additionalProperties")
        return f"table of {_type(extra, defs)}" if isinstance(extra, dict) else "table"
    fmt = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
    return fmt.get(str(kind), str(kind)) if kind else "any"


def _limits(node: Mapping[str, Any]) -> str:
    parts = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                      ("exclusiveMaximum", "<")):  # fmt: skip
        if key in node:
            parts.append(f"{sign} {node[key]}")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    for sub in node.get("anyOf", []):
        inner = _limits(sub)
        if inner:
            parts.append(inner)
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(
    title: str, model: Mapping[str, Any], defs: Mapping[str, Any], path: str
) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    """Yield (title, model, dotted path) for ``model`` and every table nested in it."""
    yield title, model, path
    for key, prop in model.get("properties", {}).items():
        options = [prop, *prop.get("anyOf", [])]
        for option in options:
            name = _ref_name(option)
            if name is not None and defs.get(name, {}).get("type") == "object":
                sub = f"{path}.{key}" if path else key
                yield from _table(f"[{sub}]", defs[name], defs, sub)
                break


def _rows(model: Mapping[str, Any], defs: Mapping[str, Any]) -> list[str]:
    required = set(model.get("required", []))
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, prop in model.get("properties", {}).items():
        if key in required:
            default = "*required*"
        elif "default" in prop:
            value = prop["default"]
            default = "*(a table)*" if isinstance(value, dict) and value else json.dumps(value)
            default = "absent" if value is None else default
        else:
            default = "absent"
        kind = _type(prop, defs)
        limits = _limits(prop)
        if limits:
            kind = f"{kind} ({limits})"
        desc = prop.get("description", "")
        out.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(desc)} |")
    return out


def reference(schema: Mapping[str, Any]) -> str:
    """The Markdown reference for the config schema (``Config.model_json_schema()``)."""
    defs = schema.get("$defs", {})
    lines = [HEADER]
    top = {k: v for k, v in schema.get("properties", {}).items() if k != "sources"}
    lines += ["## The top level", "", *_rows({**schema, "properties": top}, defs), ""]
    for key, prop in top.items():
        names = [n for n in [_ref_name(prop), *map(_ref_name, prop.get("anyOf", []))] if n]
        for name in names:
            for title, model, _path in _table(f"[{key}]", defs[name], defs, key):
                lines += [f"## {title}", "", *_rows(model, defs), ""]
    sources = schema.get("properties", {}).get("sources", {})
    items = sources.get("items", {})
    for option in items.get("oneOf", items.get("anyOf", [])):
        ref = _ref_name(option)
        if ref is None:
            continue
        model = defs[ref]
        kind = model.get("properties", {}).get("kind", {}).get("const", ref)
        lines += [f'## [[sources]] kind = "{kind}"', ""]
        if model.get("description"):
            lines += [_cell(model["description"]), ""]
        lines += [*_rows(model, defs), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def undescribed(schema: Mapping[str, Any]) -> list[str]:
    """Keys with no description, as ``Model.key``."""
    missing = []
    models = {"Config": schema, **schema.get("$defs", {})}
    for model_name, model in models.items():
        for key, prop in model.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{model_name}.{key}")
    return missing
