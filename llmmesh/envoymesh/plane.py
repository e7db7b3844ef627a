"""The local mesh with Envoy where Istio puts it (`make run MESH=envoy`): a rehearsal of the
data path Istio programs from the manifests, not Istio.

From the rendered overlay (`EnvoyOptions.overlay`, dev by default):

    client ──> ingress Envoy ──mTLS──> gateway pod sidecar ──> gateway v1 | v2   (weights, header)
                           └──mTLS (mirror)──> shadow pod sidecar ──> shadow gateway (batch)
    gateway ──> outbound Envoy (gateway identity) ──mTLS──> Triton pod sidecar ──> Triton replica
             (dialled at the replica's address with :authority = its headless Service host)

- Gateway pods: one per subset (`gateway_pods`) plus the shadow; each runs the Deployment's
  `LLMMESH_GATEWAY_MODEL_VERSION` / `_SHADOW`. The mesh's own gateway is the first v1 pod.
- Triton replica i serves `replica_versions[i]`: the orchestrator's replica list sends its
  streams, readiness probes and metrics scrapes through the outbound Envoy, with the headless
  Service's host as authority / Host, so the Triton VirtualService's routes and
  DestinationRule's pool apply and its sidecar accepts only mTLS.
- Certificates: a local CA made at start-up (`llmmesh.envoymesh.ca`), one SPIFFE identity per
  service account.

What is not rehearsed: AuthorizationPolicies, TLS at the ingress, Istio telemetry, the
control-plane hops (gateway -> orchestrator, orchestrator -> kv_registry, engines ->
kv_registry: those dial directly), the local actuator's autoscaled replicas. One outbound
Envoy serves every gateway pod (all run as `llmmesh-gateway`; without a network namespace per
pod the replica's address must mean the same to all of them), so its pools are per mesh, where
Istio's are per gateway pod, and the orchestrator's probes use it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmmesh.common.components import GATEWAY
from llmmesh.common.settings import with_env
from llmmesh.envoymesh.ca import LocalCA
from llmmesh.envoymesh.envoy import EnvoyProcess
from llmmesh.envoymesh.proxies import (
    LOCALHOST,
    Pinned,
    Pod,
    bootstrap,
    ingress,
    outbound_pinned,
    sidecar_inbound,
)
from llmmesh.envoymesh.translate import Doc, Manifests, check_destination_rules, subset_labels
from llmmesh.netutil import free_port
from llmmesh.tools.meshcheck.render import render
from services.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    import datetime

    from llmmesh.localmesh import LocalMesh, ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
DEV_OVERLAY = ROOT / "mesh" / "overlays" / "dev"
GATEWAY_VIRTUAL_SERVICE = "llmmesh-gateway"
# Triton's gRPC and metrics ports (the pool Service's).
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
# What the Deployments set that decides what a gateway pod serves.
GATEWAY_ROLE_ENV = ("LLMMESH_GATEWAY_MODEL_VERSION", "LLMMESH_GATEWAY_SHADOW")


@dataclass(frozen=True)
class EnvoyOptions:
    overlay: Path = DEV_OVERLAY
    #: The ingress listener (plaintext HTTP/1.1 and HTTP/2); 0: a free port.
    ingress_port: int = 0
    #: Gateway pods per subset of the gateway DestinationRule (the shadow always gets one).
    gateway_pods: Mapping[str, int] = field(default_factory=lambda: {"v1": 1, "v2": 1})
    #: Model version of Triton replica i (cycled), in pool `pool`.
    replica_versions: Sequence[str] = ("v1", "v2")
    pool: str = "short"
    #: The ingress routes' stream idle timeout (None: Envoy's 300 s, which Istio leaves).
    route_idle_timeout_s: float | None = None
    #: Gateway settings per pod (pod name -> LLMMESH_GATEWAY_* variables).
    gateway_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    log_level: str = "warning"


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _template_labels(deployment: Doc) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"].get("labels", {}))


def _fqdn(service: Doc) -> str:
    meta = service["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc.cluster.local"


def deployment_for(manifests: Manifests, host: str, subset_selector: Mapping[str, str]) -> Doc:
    """The Deployment whose pods back Service `host` (its selector plus the subset's labels)."""
    selector = {**manifests.service(host)["spec"]["selector"], **subset_selector}
    found = [d for d in manifests.of_kind("Deployment") if _matches(selector, _template_labels(d))]
    if len(found) != 1:
        raise KeyError(f"{host} {subset_selector}: {len(found)} Deployments")
    return found[0]


def triton_service(manifests: Manifests, version: str, pool: str) -> str:
    """The headless Service (FQDN) of pool `pool` of model version `version`."""
    for svc in manifests.of_kind("Service"):
        selector = svc["spec"].get("selector", {})
        if (
            selector.get("app.kubernetes.io/component") == "triton"
            or svc["spec"].get("clusterIP") == "None"
        ):
            for d in manifests.of_kind("Deployment"):
                labels = _template_labels(d)
                if (
                    _matches(selector, labels)
                    and labels.get("app.kubernetes.io/component") == "triton"
                    and labels.get("version") == version
                    and labels.get("llmmesh.io/pool") == pool
                ):
                    return _fqdn(svc)
    raise KeyError(f"no Triton Service for {version}/{pool}")


def _role_env(deployment: Doc) -> dict[str, str]:
    """The Deployment's LLMMESH_GATEWAY_MODEL_VERSION / _SHADOW."""
    out: dict[str, str] = {}
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] in GATEWAY_ROLE_ENV and "value" in e:
                out[e["name"]] = str(e["value"])
    return out


class EnvoyDataPlane:
    """The `llmmesh.localmesh.DataPlane` that puts Envoy in the local mesh's paths."""

    def __init__(self, options: EnvoyOptions, now: datetime.datetime):
        self.options = options
        self.manifests = Manifests(render(options.overlay))
        self._now = now
        self._ca: LocalCA | None = None
        self.triton_pods: list[Pod] = []
        self.gateway_pods: list[Pod] = []
        self.gateways: dict[str, ServiceProcess] = {}  # pod name -> its process
        self.sidecars: dict[str, EnvoyProcess] = {}  # pod name -> its sidecar
        self.outbound: EnvoyProcess | None = None
        self.ingress: EnvoyProcess | None = None
        self.ingress_port = options.ingress_port or free_port()
        self._replica_ports: dict[int, tuple[int, int]] = {}  # outbound (grpc, metrics)
        vs = self.manifests.virtual_service(GATEWAY_VIRTUAL_SERVICE)
        self.gateway_host = str(vs["spec"]["http"][0]["route"][0]["destination"]["host"])
        # What the translation cannot rehearse fails here, before anything starts.
        check_destination_rules(self.manifests)

    @property
    def ca(self) -> LocalCA:
        if self._ca is None:
            raise RuntimeError("the data plane is not started")
        return self._ca

    def _version(self, index: int) -> str:
        versions = self.options.replica_versions
        return versions[index % len(versions)]

    def replica_route(self, index: int) -> dict[str, Any]:
        """How the orchestrator (and through Admit, the gateways) reach replica `index`: its
        stand-in pod address on the outbound Envoy, the headless Service's authority, its model
        version."""
        grpc, metrics = self._replica_ports.setdefault(index, (free_port(), free_port()))
        host = triton_service(self.manifests, self._version(index), self.options.pool)
        return {
            "grpc_address": f"{LOCALHOST}:{grpc}",
            "authority": f"{host}:{TRITON_GRPC_PORT}",
            "metrics_url": f"http://{LOCALHOST}:{metrics}/metrics",
            "metrics_host": f"{host}:{TRITON_METRICS_PORT}",
            "model_version": self._version(index),
        }

    async def replicas_started(self, mesh: LocalMesh) -> None:
        """Sidecars in front of the Triton replicas and the gateways' outbound Envoy, before
        the orchestrator probes the replicas through them."""
        self._ca = LocalCA(mesh.workdir / "certs", self._now)
        m = self.manifests
        pinned: list[Pinned] = []
        for i, (rid, server) in enumerate(zip(mesh.replica_ids, mesh.tritons, strict=True)):
            host = triton_service(m, self._version(i), self.options.pool)
            deployment = deployment_for(m, host, {})
            pod = Pod(
                name=rid,
                host=host,
                service_account=m.service_account(deployment["metadata"]["name"]),
                labels=_template_labels(deployment),
                app_ports={
                    TRITON_GRPC_PORT: server.ports.grpc,
                    TRITON_METRICS_PORT: server.ports.metrics,
                },
                inbound_ports={TRITON_GRPC_PORT: free_port(), TRITON_METRICS_PORT: free_port()},
            )
            self.triton_pods.append(pod)
            grpc, metrics = self._replica_ports.setdefault(i, (free_port(), free_port()))
            pinned += [
                Pinned(pod, TRITON_GRPC_PORT, grpc),
                Pinned(pod, TRITON_METRICS_PORT, metrics),
            ]
        # The outbound Envoy speaks for every gateway pod: the gateways' service account.
        first = self._gateway_deployment(next(iter(self.options.gateway_pods)))
        me = self.ca.identity(
            self.gateway_host.split(".")[1], m.service_account(first["metadata"]["name"])
        )
        listeners, clusters = outbound_pinned(m, pinned, me, self.ca.root_cert)
        self.outbound = EnvoyProcess(
            "outbound-gateway",
            bootstrap("outbound-gateway", listeners, clusters),
            mesh.workdir,
            self.options.log_level,
        )
        sidecars = [self._sidecar(pod, mesh.workdir) for pod in self.triton_pods]
        await asyncio.gather(self.outbound.start(), *(s.start() for s in sidecars))

    def mesh_gateway_env(self) -> dict[str, str]:
        """What the mesh's own gateway (the first pod of the first subset) must be started
        with (`MeshOptions.extra_env`): that Deployment's model version and role."""
        first = next(iter(self.options.gateway_pods))
        env = _role_env(self._gateway_deployment(first))
        return {**env, **self.options.gateway_env.get(f"gateway-{first}-0", {})}

    def _gateway_deployment(self, subset: str) -> Doc:
        dr = self.manifests.destination_rule(self.gateway_host)
        return deployment_for(self.manifests, self.gateway_host, subset_labels(dr, subset))

    def _sidecar(self, pod: Pod, workdir: Path) -> EnvoyProcess:
        listeners, clusters = sidecar_inbound(self.manifests, pod, self.ca)
        proxy = EnvoyProcess(
            pod.name, bootstrap(pod.name, listeners, clusters), workdir, self.options.log_level
        )
        self.sidecars[pod.name] = proxy
        return proxy

    async def gateway_started(self, mesh: LocalMesh) -> None:
        """The other gateway pods (subsets, shadow), every gateway pod's sidecar, then the
        ingress."""
        m = self.manifests
        base = mesh.services[GATEWAY.name]
        if not isinstance(base.settings, GatewaySettings):
            raise TypeError(type(base.settings))
        base_settings = base.settings
        shadow_host = self._shadow_host()
        plan: list[tuple[str, str, Doc]] = []  # (pod name, service host, deployment)
        for subset, count in self.options.gateway_pods.items():
            deployment = self._gateway_deployment(subset)
            plan += [(f"gateway-{subset}-{k}", self.gateway_host, deployment) for k in range(count)]
        if shadow_host is not None:
            plan.append(("gateway-shadow", shadow_host, deployment_for(m, shadow_host, {})))
        starting = []
        for k, (name, _, deployment) in enumerate(plan):
            env = {**_role_env(deployment), **self.options.gateway_env.get(name, {})}
            if k == 0:
                # The mesh's own gateway is the first pod; it must serve what that pod serves.
                expected = with_env(base_settings, env)
                if (expected.model_version, expected.shadow) != (
                    base_settings.model_version,
                    base_settings.shadow,
                ):
                    raise ValueError(
                        f"the mesh's gateway is pod {name}: start it with "
                        "MeshOptions.extra_env=mesh_gateway_env()"
                    )
                svc = base
            else:
                settings = with_env(
                    base_settings.model_copy(
                        update={"grpc_port": 0, "http_port": 0, "metrics_port": 0}
                    ),
                    env,
                )
                svc = mesh._service(GATEWAY, settings, name)
                starting.append(svc.start())
            self.gateways[name] = svc
        await asyncio.gather(*starting)
        sidecars = []
        for name, host, deployment in plan:
            svc = self.gateways[name]
            # The Service ports the ingress routes to, by name (metrics are not fronted).
            local = {"grpc": svc.grpc_port, "http-openai": svc.http_port}
            app = {
                int(p["port"]): local[p["name"]]
                for p in m.service(host)["spec"]["ports"]
                if p["name"] in local
            }
            pod = Pod(
                name=name,
                host=host,
                service_account=m.service_account(deployment["metadata"]["name"]),
                labels=_template_labels(deployment),
                app_ports=app,
                inbound_ports={p: free_port() for p in app},
            )
            self.gateway_pods.append(pod)
            sidecars.append(self._sidecar(pod, mesh.workdir))
        await asyncio.gather(*(s.start() for s in sidecars))
        self.ingress = EnvoyProcess(
            "ingress",
            ingress(
                m,
                GATEWAY_VIRTUAL_SERVICE,
                self.ingress_port,
                self.gateway_pods,
                self.ca,
                self.options.route_idle_timeout_s,
            ),
            mesh.workdir,
            self.options.log_level,
        )
        await self.ingress.start()

    def _shadow_host(self) -> str | None:
        vs = self.manifests.virtual_service(GATEWAY_VIRTUAL_SERVICE)
        for http in vs["spec"]["http"]:
            if "mirror" in http:
                return str(http["mirror"]["host"])
        return None

    def processes(self) -> list[EnvoyProcess]:
        out = [self.ingress, *self.sidecars.values(), self.outbound]
        return [p for p in out if p is not None]

    async def stop(self) -> None:
        """The gateway pods this plane started (the mesh stops its own gateway), then the
        Envoys (`stop_gateways`, `stop_proxies`)."""
        await self.stop_gateways()
        await self.stop_proxies()

    async def stop_gateways(self) -> None:
        """The gateway pods this plane started, draining: their streams still flow through the
        proxies (the ingress, their sidecars, the outbound Envoy to the engines)."""
        await asyncio.gather(
            *(svc.stop() for name, svc in self.gateways.items() if svc.name != GATEWAY.name)
        )

    async def stop_proxies(self) -> None:
        """Every Envoy of the plane (once the gateways drained: nothing flows through them)."""
        await asyncio.gather(*(p.stop() for p in self.processes()))

    def endpoints(self) -> dict[str, str]:
        out = {
            "ingress Envoy (gRPC + OpenAI API)": f"{LOCALHOST}:{self.ingress_port}",
        }
        out.update({f"Envoy admin {p.name}": p.admin for p in self.processes()})
        return out
