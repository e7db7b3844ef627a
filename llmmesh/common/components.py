"""The llmmesh services, one entry each, and how each one is spelled where.

Each component declares two spellings, its Python name (`kv_registry`) and its Kubernetes name
(`kv-registry`: DNS labels have no underscores); its proto package comes from its gRPC API
(`kvregistry`). Every other spelling follows from those three; kv_registry is the one component
where they differ:

| where                                              | spelling              | kv_registry              |
|----------------------------------------------------|-----------------------|--------------------------|
| Python package, `python -m` module                 | `services.<name>`     | `services.kv_registry`   |
| settings env prefix (the settings class's)         | `LLMMESH_<NAME>_`     | `LLMMESH_KV_REGISTRY_`   |
| Prometheus metric prefix                           | `llmmesh_<name>_`     | `llmmesh_kv_registry_`   |
| proto package (`protos/llmmesh/<proto>/v1`)        | `llmmesh.<proto>.v1`  | `llmmesh.kvregistry.v1`  |
| Kubernetes: mesh/base/<k8s>.yaml, `llmmesh-<k8s>` | `<k8s>`               | `kv-registry`            |

The proto package and gRPC service name are read from the generated descriptors, not written
here. Ports and env prefixes are declared by each service's settings class (this library sits
below the services and does not import them); tests/common/test_components.py checks that those
classes, docs/conventions.md and mesh/base agree with this catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import FileDescriptor

from llmmesh.common.settings import ENV_ROOT
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2
from llmmesh.generated.gateway.v1 import gateway_pb2
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2


@dataclass(frozen=True, slots=True)
class Component:
    """One llmmesh service."""

    name: str
    """The Python spelling: package `services.<name>`."""
    k8s_name: str
    """The Kubernetes spelling (DNS label: hyphens)."""
    api: FileDescriptor
    """The proto file of the service's gRPC API."""

    @property
    def module(self) -> str:
        """What `python -m` runs."""
        return f"services.{self.name}"

    @property
    def settings_class(self) -> str:
        """Name of the pydantic-settings class in `services.<name>.settings`."""
        return "".join(part.capitalize() for part in self.name.split("_")) + "Settings"

    @property
    def env_prefix(self) -> str:
        return f"{ENV_ROOT}{self.name.upper()}_"

    @property
    def metric_prefix(self) -> str:
        return f"llmmesh_{self.name}_"

    @property
    def proto_package(self) -> str:
        """E.g. `llmmesh.kvregistry.v1`."""
        return self.api.package

    @property
    def grpc_service(self) -> str:
        """Full name of the service's own gRPC service, e.g. `llmmesh.gateway.v1.GatewayService`."""
        (service,) = self.api.services_by_name.values()
        return service.full_name

    @property
    def k8s_object(self) -> str:
        """Name of the component's Service and ServiceAccount (its Deployments' names and `app`
        labels start with it)."""
        return f"llmmesh-{self.k8s_name}"


GATEWAY = Component("gateway", "gateway", gateway_pb2.DESCRIPTOR)
ORCHESTRATOR = Component("orchestrator", "orchestrator", orchestrator_pb2.DESCRIPTOR)
KV_REGISTRY = Component("kv_registry", "kv-registry", kvregistry_pb2.DESCRIPTOR)
AUTOSCALER = Component("autoscaler", "autoscaler", autoscaler_pb2.DESCRIPTOR)

#: Every llmmesh service.
COMPONENTS: tuple[Component, ...] = (GATEWAY, ORCHESTRATOR, KV_REGISTRY, AUTOSCALER)


def by_name(name: str) -> Component:
    """The component whose Python spelling is `name`."""
    for c in COMPONENTS:
        if c.name == name:
            return c
    raise KeyError(f"no component {name!r}; known: {', '.join(c.name for c in COMPONENTS)}")
