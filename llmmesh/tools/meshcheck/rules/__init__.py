"""The consistency rules, by topic. Each rule takes one rendered overlay (`Mesh`) and returns its
problems as sentences (empty: ok), so tests can also feed it broken documents and check that it
notices. `RULES` and `SETTINGS_RULES` are everything `python -m llmmesh.tools.meshcheck` runs on
each overlay."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.project import ComponentSettings
from llmmesh.tools.meshcheck.rules import (
    observability,
    ports,
    readme,
    redis,
    routing,
    security,
    workloads,
)

Rule = Callable[[Mesh], list[str]]
# Rules that also compare with the services' settings (ports, defaults, field names).
SettingsRule = Callable[[Mesh, Mapping[str, ComponentSettings]], list[str]]

RULES: dict[str, Rule] = {
    "hosts": routing.check_hosts,
    "subsets": routing.check_subsets,
    "canary": routing.check_canary,
    "retries_and_timeouts": routing.check_retries_and_timeouts,
    "namespaces": security.check_namespaces,
    "authorization": security.check_authorization,
    "destination_rules": security.check_destination_rules,
    "mtls": security.check_mtls,
    "replica_discovery": workloads.check_replica_discovery,
    "autoscaling": workloads.check_autoscaling,
    "capacity": workloads.check_capacity,
    "workloads": workloads.check_workloads,
    "kv_registry_replicas": workloads.check_kv_registry_replicas,
    "orchestrator_replicas": workloads.check_orchestrator_replicas,
    "gateway_models": workloads.check_gateway_models,
    "redis": redis.check_redis,
    "tracing": observability.check_tracing,
    "dashboards": observability.check_dashboards,
    "metrics": observability.check_metrics,
    "scrape": observability.check_scrape,
    "alerts": observability.check_alerts,
    "autoscaler_signals": observability.check_autoscaler_signals,
    "readme_circuit_breaking": readme.check_circuit_breaking_table,
    "readme_mirror_percentage": readme.check_mirror_percentage,
    "readme_walkthrough": readme.check_walkthrough,
}
SETTINGS_RULES: dict[str, SettingsRule] = {
    "ports": ports.check_ports,
    "settings_fields": ports.check_settings_fields,
}
