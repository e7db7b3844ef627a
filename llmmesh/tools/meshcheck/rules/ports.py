"""Port and settings rules: the services' settings classes, ConfigMaps, container ports, probes,
Services and dialled addresses agree; Triton listens where the Services point."""

from __future__ import annotations

from collections.abc import Mapping

from llmmesh.common.components import COMPONENTS
from llmmesh.tools.meshcheck.common import doc_id
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.project import ComponentSettings
from llmmesh.tools.meshcheck.rules.helpers import (
    TRITON_PORTS,
    component_deployments,
    port_by_name,
    triton_deployments,
)


def check_ports(mesh: Mesh, settings: Mapping[str, ComponentSettings]) -> list[str]:
    """Ports agree between the services' settings, their env (ConfigMaps), container ports,
    probes, Services, AuthorizationPolicies and the addresses other components dial."""
    problems: list[str] = []
    named = {"grpc": "grpc", "metrics": "http-metrics", "http": "http-openai"}
    for comp in COMPONENTS:
        facts = settings[comp.name]
        deps = component_deployments(mesh, comp)
        if not deps:
            problems.append(f"{comp.k8s_object}: no Deployment")
        for dep in deps:
            container = mesh.main_container(dep)
            env = mesh.container_env(dep, container)
            if env.get(f"{comp.env_prefix}HOST") != "0.0.0.0":
                problems.append(
                    f"{doc_id(dep)}: {comp.env_prefix}HOST must be 0.0.0.0 (default binds loopback)"
                )
            for key, expected in facts.ports.items():
                env_key = f"{comp.env_prefix}{key.upper()}_PORT"
                if env.get(env_key) not in (None, str(expected)):
                    problems.append(
                        f"{doc_id(dep)}: {env_key}={env.get(env_key)} but the setting says {expected}"
                    )
                actual = int(env.get(env_key, expected))
                cport = port_by_name(container.get("ports", []), named[key])
                if cport is None or int(cport["containerPort"]) != actual:
                    problems.append(
                        f"{doc_id(dep)}: container port {named[key]} should be {actual}, is {cport}"
                    )
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = container.get(probe, {}).get("grpc")
                if grpc is None or int(grpc["port"]) != facts.ports["grpc"]:
                    problems.append(
                        f"{doc_id(dep)}: {probe} must be a gRPC health probe on {facts.ports['grpc']}"
                    )
        for svc in mesh.in_namespace("Service"):
            if svc["spec"].get("selector", {}).get("app", "").startswith(comp.k8s_object):
                for key, expected in facts.ports.items():
                    sport = port_by_name(svc["spec"]["ports"], named[key])
                    if sport is None or int(sport["port"]) != expected:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} should be {expected}, is {sport}"
                        )
                    elif sport.get("targetPort") != named[key]:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} should target the named container port"
                        )
                    expected_proto = "grpc" if key == "grpc" else "http"
                    if sport is not None and sport.get("appProtocol") != expected_proto:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} appProtocol should be {expected_proto}"
                        )
    problems += _check_addresses(mesh)
    problems += _check_triton_ports(mesh)
    return problems


def check_settings_fields(mesh: Mesh, settings: Mapping[str, ComponentSettings]) -> list[str]:
    """Every LLMMESH_<SERVICE>_* variable a Deployment sets is a field of the service's settings
    class (pydantic-settings ignores unknown ones silently). Skipped for a class not importable."""
    unknown: dict[str, set[str]] = {}
    for comp in COMPONENTS:
        facts = settings[comp.name]
        if facts.fields is None:
            continue
        for dep in component_deployments(mesh, comp):
            for key in mesh.container_env(dep, mesh.main_container(dep)):
                if key.startswith(facts.env_prefix):
                    field = key[len(facts.env_prefix) :].lower()
                    if field not in facts.fields:
                        unknown.setdefault(
                            f"{key} is no field of {comp.settings_class}", set()
                        ).add(dep["metadata"]["name"])
    return [f"{msg} (set on {', '.join(sorted(deps))})" for msg, deps in sorted(unknown.items())]


def _check_addresses(mesh: Mesh) -> list[str]:
    """Every *_ADDRESS setting names a Service's gRPC port."""
    problems: list[str] = []
    for dep, _tpl in mesh.pod_templates():
        env = mesh.container_env(dep, mesh.main_container(dep))
        for key, value in env.items():
            if not key.endswith("_ADDRESS"):
                continue
            host, _, port = value.rpartition(":")
            svc = mesh.service_for_host(host)
            if svc is None:
                problems.append(f"{doc_id(dep)}: {key}={value} names no Service")
                continue
            grpc = port_by_name(svc["spec"]["ports"], "grpc")
            if grpc is None or str(grpc["port"]) != port:
                problems.append(
                    f"{doc_id(dep)}: {key}={value} is not the gRPC port of {svc['metadata']['name']}"
                )
    return problems


def _check_triton_ports(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    for dep in triton_deployments(mesh):
        c = mesh.main_container(dep)
        args = c.get("args", [])
        for key, flag in (
            ("http", "--http-port"),
            ("grpc", "--grpc-port"),
            ("metrics", "--metrics-port"),
        ):
            if f"{flag}={TRITON_PORTS[key]}" not in args:
                problems.append(f"{doc_id(dep)}: tritonserver needs {flag}={TRITON_PORTS[key]}")
            name = "http-metrics" if key == "metrics" else key
            cport = port_by_name(c.get("ports", []), name)
            if cport is None or int(cport["containerPort"]) != TRITON_PORTS[key]:
                problems.append(
                    f"{doc_id(dep)}: container port {name} should be {TRITON_PORTS[key]}"
                )
    return problems
