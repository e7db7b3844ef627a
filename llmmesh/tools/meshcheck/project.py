"""Project facts the manifests must agree with: the gRPC methods in protos/, the ports and metric
names in docs/conventions.md and llmmesh.common.metric_names, and the services' settings classes.

The settings classes are the one place meshcheck reaches into services/: `component_settings`
imports `services.<svc>.settings` by name (importlib, not an import statement, so the layering
contract that keeps llmmesh.tools free of services/ does not see it) to cross-check ports and
environment variables, and falls back to docs/conventions.md when the class is not importable.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from llmmesh.common import metric_names
from llmmesh.common.components import Component
from llmmesh.tools.meshcheck.common import REPO

# Principals outside namespace llmmesh that the AuthorizationPolicies may name (mesh/README.md,
# "Prerequisites"): they are installed by the platform, not by these manifests.
EXTERNAL_PRINCIPALS = {
    "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account": "Istio ingress gateway",
    "cluster.local/ns/monitoring/sa/prometheus": "Prometheus server",
    "cluster.local/ns/keda/sa/keda-operator": "KEDA operator",
}

# gRPC streams a client holds open for as long as it runs, each carrying many requests (each with
# its own deadline in the client) or updates: a route timeout would cut them, so their route sets
# none.
SESSION_STREAMS = frozenset(
    {
        "/llmmesh.kvregistry.v1.KvRegistryService/LookupStream",
        "/llmmesh.kvregistry.v1.KvRegistryService/WatchExact",
        "/llmmesh.orchestrator.v1.OrchestratorService/AdmitStream",
    }
)

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


@cache
def conventions_text() -> str:
    return (REPO / "docs" / "conventions.md").read_text()


@cache
def conventions_ports() -> dict[str, dict[str, int]]:
    """Default ports per component from the component table in docs/conventions.md: the columns
    headed gRPC, HTTP and metrics, wherever the table puts them."""
    out: dict[str, dict[str, int]] = {}
    columns: dict[str, int] = {}
    for line in conventions_text().splitlines():
        if not line.startswith("|"):
            columns = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "component":
            heads = [c.split(" ")[0].lower() for c in cells]
            columns = {key: heads.index(key) for key in ("grpc", "http", "metrics") if key in heads}
            continue
        ports = {
            key: int(m.group(1))
            for key, i in columns.items()
            if i < len(cells) and (m := re.match(r"^(\d+)", cells[i]))
        }
        if "grpc" in ports:
            out[cells[0]] = ports
    return out


def llmmesh_metrics() -> frozenset[str]:
    """Every metric name llmmesh exposes or reads (llmmesh.common.metric_names)."""
    return frozenset(
        value
        for name, value in vars(metric_names).items()
        if name.isupper() and isinstance(value, str)
    )


@dataclass(frozen=True)
class ComponentSettings:
    ports: dict[str, int]  # grpc, metrics, (http)
    fields: frozenset[str] | None  # settings field names when the class could be imported
    env_prefix: str


def component_settings(comp: Component) -> tuple[ComponentSettings, str]:
    """Ports (and settings fields) of a component: from its pydantic-settings class when it can be
    imported, else from docs/conventions.md. Returns the facts and where they came from."""
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
    except (
        Exception
    ) as exc:  # ImportError, AttributeError, missing fields: use the documented ports
        ports = conventions_ports()[comp.name]
        return (
            ComponentSettings(dict(ports), None, comp.env_prefix),
            f"docs/conventions.md (settings class not importable: {type(exc).__name__}: {exc})",
        )
