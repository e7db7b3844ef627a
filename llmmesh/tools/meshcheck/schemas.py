"""Validate rendered documents against the Kubernetes 1.32 JSON schemas and the Istio 1.30.3 CRD
`openAPIV3Schema` in shared/schemas, made as strict as the API server's field validation (unknown
fields are errors), plus the CRDs' CEL rules that meshcheck can evaluate. Kinds without a published
schema use `basic_schemas.BASIC_SCHEMAS`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator  # type: ignore[import-untyped, unused-ignore]
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped, unused-ignore]

from llmmesh.tools.meshcheck.basic_schemas import BASIC_SCHEMAS, OBJECT_META
from llmmesh.tools.meshcheck.common import Doc, Finding, doc_id, go_duration_ms, json_path

_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "definitions", "$defs")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf")
_SCHEMA_KEYS = ("additionalProperties", "not", "items", "additionalItems")


def strictify(node: Any) -> Any:
    """An OpenAPI v3 structural schema as a strict JSON schema (draft 7).

    Objects with declared properties reject unknown fields (the API server's strict field
    validation; otherwise it silently prunes them), `nullable` admits null, and
    `x-kubernetes-int-or-string` admits both.
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            out[key] = {k: strictify(v) for k, v in value.items()}
        elif key in _SCHEMA_LIST_KEYS and isinstance(value, list):
            out[key] = [strictify(v) for v in value]
        elif key in _SCHEMA_KEYS and isinstance(value, (dict, list)):
            out[key] = (
                [strictify(v) for v in value] if isinstance(value, list) else strictify(value)
            )
        else:
            out[key] = value
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# CEL rules (x-kubernetes-validations) of the Istio CRDs that apply to documents like ours.
def _cel_min_duration(value: Any) -> bool:
    ms = go_duration_ms(value) if isinstance(value, str) else None
    return ms is not None and ms >= 1.0


def _cel_ports(value: Any) -> bool:
    try:
        return isinstance(value, dict) and all(0 < int(k) <= 65535 for k in value)
    except ValueError:
        return False


_CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "duration(self) >= duration('1ms')": _cel_min_duration,
    'self.all(key, !key.contains("*"))': lambda v: (
        isinstance(v, dict) and all("*" not in k for k in v)
    ),
    "self.all(key, key.size() != 0)": lambda v: isinstance(v, dict) and all(k != "" for k in v),
    '!self.contains("*")': lambda v: isinstance(v, str) and "*" not in v,
    "self.all(key, 0 < int(key) && int(key) <= 65535)": _cel_ports,
}
_CEL_AT_MOST_ONE = re.compile(
    r"^\(has\(self\.\w+\) \? 1 : 0\)( \+ \(has\(self\.\w+\) \? 1 : 0\))+ <= 1$"
)


def _cel_check(rule: str, value: Any) -> bool | None:
    """True/False when the rule is one we evaluate, None when it is not."""
    fn = _CEL_RULES.get(rule)
    if fn is not None:
        return fn(value)
    if _CEL_AT_MOST_ONE.match(rule):
        fields = re.findall(r"has\(self\.(\w+)\)", rule)
        return isinstance(value, dict) and sum(f in value for f in fields) <= 1
    return None


@dataclass
class _Entry:
    validator: Any
    crd_schema: dict[str, Any] | None  # the (non-strict) openAPIV3Schema, for CEL rules
    source: str


class SchemaValidator:
    """Validates rendered documents; `unevaluated_cel_rules` collects CEL rules it skipped."""

    def __init__(self, shared: Path):
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.unevaluated_cel_rules: set[str] = set()
        for path in sorted((shared / "schemas" / "kubernetes").glob("*.json")):
            schema = json.loads(path.read_text())
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                api = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
                self.entries[(api, gvk["kind"])] = _Entry(
                    Draft7Validator(schema), None, f"shared/schemas/kubernetes/{path.name}"
                )
        crd_file = shared / "schemas" / "istio" / "crd-all.gen.istio-1.30.3.yaml"
        for crd in yaml.safe_load_all(crd_file.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", False):
                    continue
                api = f"{group}/{version['name']}"
                root = version["schema"]["openAPIV3Schema"]
                spec_schema = root.get("properties", {}).get("spec", {"type": "object"})
                strict = {
                    "type": "object",
                    "properties": {
                        "apiVersion": {"const": api},
                        "kind": {"const": kind},
                        "metadata": OBJECT_META,
                        "spec": strictify(spec_schema),
                        "status": {"type": "object"},
                    },
                    "required": ["apiVersion", "kind", "metadata"],
                    "additionalProperties": False,
                }
                self.entries[(api, kind)] = _Entry(
                    Draft7Validator(strict),
                    spec_schema,
                    f"{crd_file.name} {kind} {version['name']}",
                )
        for key, schema in BASIC_SCHEMAS.items():
            self.entries.setdefault(
                key, _Entry(Draft7Validator(schema), None, "llmmesh.tools.meshcheck.basic_schemas")
            )

    def source_for(self, doc: Mapping[str, Any]) -> str | None:
        entry = self.entries.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        return entry.source if entry else None

    def validate(self, doc: Mapping[str, Any]) -> list[Finding]:
        ident = doc_id(doc)
        entry = self.entries.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if entry is None:
            return [
                Finding(
                    ident,
                    "$",
                    f"no schema for apiVersion={doc.get('apiVersion')} kind={doc.get('kind')}: "
                    "add one (llmmesh/tools/meshcheck/basic_schemas.py BASIC_SCHEMAS) or use a known version",
                )
            ]
        findings: set[Finding] = set()
        for err in entry.validator.iter_errors(doc):
            findings.update(_findings_from_error(ident, err))
        if entry.crd_schema is not None and isinstance(doc.get("spec"), dict):
            findings.update(self._cel(ident, entry.crd_schema, doc["spec"], ["spec"]))
        return sorted(findings)

    def _cel(self, ident: str, schema: Any, value: Any, path: list[Any]) -> list[Finding]:
        out: list[Finding] = []
        if not isinstance(schema, dict):
            return out
        for rule in schema.get("x-kubernetes-validations", []) or []:
            result = _cel_check(rule["rule"], value)
            if result is None:
                self.unevaluated_cel_rules.add(rule["rule"])
            elif not result:
                message = rule.get("message") or f"violates CEL rule {rule['rule']!r}"
                out.append(Finding(ident, json_path(path), f"{message} (value {value!r})"))
        props = schema.get("properties", {})
        addl = schema.get("additionalProperties")
        if isinstance(value, dict):
            for key, child in value.items():
                sub = props.get(key, addl if isinstance(addl, dict) else None)
                if sub is not None:
                    out.extend(self._cel(ident, sub, child, [*path, key]))
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, child in enumerate(value):
                out.extend(self._cel(ident, schema["items"], child, [*path, i]))
        return out


def _findings_from_error(ident: str, err: ValidationError) -> list[Finding]:
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in known]
        if extra:
            return [
                Finding(ident, json_path([*path, k]), f"unknown field {k!r} (not in the schema)")
                for k in extra
            ]
    if err.validator in ("oneOf", "anyOf") and err.context:
        deepest = max(err.context, key=lambda e: len(list(e.absolute_path)))
        if len(list(deepest.absolute_path)) > len(path):
            return _findings_from_error(ident, deepest)
    message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
    return [Finding(ident, json_path(path), message)]


@cache
def schema_validator(shared: Path) -> SchemaValidator:
    """One validator per shared/ directory (loading the schemas takes a while)."""
    return SchemaValidator(shared)


def validate_all(validator: SchemaValidator, docs: list[Doc]) -> list[Finding]:
    return [f for d in docs for f in validator.validate(d)]
