"""Workload rules: replica discovery, autoscaling, capacity against admission control, pod security,
resources, probes, disruption budgets and shutdown timing, and which model each gateway serves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from llmmesh.common.components import GATEWAY, KV_REGISTRY, ORCHESTRATOR, Component
from llmmesh.tools.meshcheck.common import REPO, doc_id, go_duration_ms, require
from llmmesh.tools.meshcheck.index import Mesh, labels_match, service_host
from llmmesh.tools.meshcheck.rules.helpers import (
    TRITON_PORTS,
    autoscaler_env,
    component_deployments,
    env_of,
    is_redis,
    orchestrator_env,
    policy_of,
    port_by_name,
    triton_deployments,
)
from llmmesh.triton.launcher import (
    GENERATE_PROBE_BODY,
    GENERATE_PROBE_PATH,
    GENERATE_PROBE_SCRIPT,
    TRITON_LIVENESS,
    TRITON_READINESS,
    LivenessProbe,
    generate_probe_command,
)


def check_replica_discovery(mesh: Mesh) -> list[str]:
    """LLMMESH_ORCHESTRATOR_REPLICA_DNS lists exactly the Triton headless Services."""
    problems: list[str] = []
    env = orchestrator_env(mesh)
    entries: list[dict[str, Any]] = json.loads(env["LLMMESH_ORCHESTRATOR_REPLICA_DNS"])
    listed: set[str] = set()
    policy_pools = set(policy_of(mesh)["pools"])
    for e in entries:
        svc = mesh.service_for_host(e["host"])
        if svc is None:
            problems.append(f"REPLICA_DNS host {e['host']} names no Service")
            continue
        listed.add(svc["metadata"]["name"])
        sel = svc["spec"]["selector"]
        if svc["spec"].get("clusterIP") != "None":
            problems.append(
                f"{doc_id(svc)}: replica discovery needs a headless Service (clusterIP None)"
            )
        if (sel.get("llmmesh.io/pool"), sel.get("version")) != (e["pool"], e["model_version"]):
            problems.append(
                f"REPLICA_DNS {e['host']}: pool/model_version {e['pool']}/{e['model_version']} vs selector {sel}"
            )
        if e["pool"] not in policy_pools:
            problems.append(
                f"REPLICA_DNS {e['host']}: pool {e['pool']} is not in policy.yaml pools"
            )
        for key, name in (("port", "grpc"), ("metrics_port", "http-metrics")):
            sport = port_by_name(svc["spec"]["ports"], name)
            if sport is None or int(sport["port"]) != int(e[key]):
                problems.append(
                    f"REPLICA_DNS {e['host']}: {key} {e[key]} is not the Service's {name} port"
                )
    autoscaler = json.loads(autoscaler_env(mesh).get("LLMMESH_AUTOSCALER_REPLICA_DNS", "null"))
    if autoscaler != entries:
        problems.append(
            "LLMMESH_AUTOSCALER_REPLICA_DNS must equal LLMMESH_ORCHESTRATOR_REPLICA_DNS"
        )
    for dep in triton_deployments(mesh):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        replica_id = mesh.container_env(dep, mesh.main_container(dep)).get(
            "LLMMESH_EMULATOR_REPLICA_ID"
        )
        expected_id = f"{labels.get('llmmesh.io/pool')}-{labels.get('version')}-$(POD_IP)"
        if replica_id != expected_id:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_EMULATOR_REPLICA_ID {replica_id} != orchestrator id {expected_id}"
            )
        svcs = [
            s
            for s in mesh.in_namespace("Service")
            if s["spec"].get("selector") and labels_match(s["spec"]["selector"], labels)
        ]
        if len(svcs) != 1 or svcs[0]["metadata"]["name"] not in listed:
            problems.append(
                f"{doc_id(dep)}: needs exactly one headless Service listed in REPLICA_DNS"
            )
    return problems


def check_autoscaling(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    autoscaler = require(mesh.get("Service", "llmmesh-autoscaler"), "Service llmmesh-autoscaler")
    grpc = require(
        port_by_name(autoscaler["spec"]["ports"], "grpc"), "port grpc of llmmesh-autoscaler"
    )
    address = f"{service_host('llmmesh-autoscaler', mesh.namespace)}:{grpc['port']}"
    scaled: dict[str, str] = {}
    for so in mesh.in_namespace("ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        scaled[target] = doc_id(so)
        dep = mesh.get("Deployment", target)
        if dep is None:
            problems.append(f"{doc_id(so)}: target Deployment {target} does not exist")
            continue
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for trig in so["spec"]["triggers"]:
            md = trig["metadata"]
            if trig["type"] != "external" or md.get("scalerAddress") != address:
                problems.append(f"{doc_id(so)}: trigger must be external at {address}")
            if (md.get("pool"), md.get("model_version")) != (
                labels.get("llmmesh.io/pool"),
                labels.get("version"),
            ):
                problems.append(
                    f"{doc_id(so)}: metadata pool/model_version disagree with {target}'s labels"
                )
        spec = so["spec"]
        if not 0 < int(spec.get("minReplicaCount", 0)) <= int(spec["maxReplicaCount"]):
            problems.append(f"{doc_id(so)}: needs 0 < minReplicaCount <= maxReplicaCount")
    for hpa in mesh.in_namespace("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if mesh.get("Deployment", target) is None:
            problems.append(f"{doc_id(hpa)}: target {target} does not exist")
        scaled[target] = doc_id(hpa)
        kinds = {m["type"] for m in hpa["spec"].get("metrics", [])}
        resources = {
            m.get("resource", m.get("containerResource", {})).get("name")
            for m in hpa["spec"]["metrics"]
        }
        if not kinds <= {"Resource", "ContainerResource"} or resources != {"cpu"}:
            problems.append(f"{doc_id(hpa)}: expected a CPU HPA")
    for dep in triton_deployments(mesh):
        if dep["metadata"]["name"] not in scaled:
            problems.append(f"{doc_id(dep)}: no ScaledObject")
    for dep in component_deployments(mesh, GATEWAY):
        if dep["metadata"]["name"] not in scaled:
            problems.append(f"{doc_id(dep)}: gateway Deployment without HPA")
    for dep in mesh.in_namespace("Deployment"):
        if dep["metadata"]["name"] in scaled and "replicas" in dep["spec"]:
            problems.append(
                f"{doc_id(dep)}: sets spec.replicas but {scaled[dep['metadata']['name']]} owns it"
            )
    return problems


def check_capacity(mesh: Mesh) -> list[str]:
    """Envoy's limits sit behind the orchestrator's admission control, never in front of it, and
    the Triton outlier detection mirrors the orchestrator's ejection policy."""
    problems: list[str] = []
    policy = policy_of(mesh)
    env = orchestrator_env(mesh)
    for e in json.loads(env["LLMMESH_ORCHESTRATOR_REPLICA_DNS"]):
        svc = mesh.service_for_host(e["host"])
        if svc is None:
            continue
        name = svc["metadata"]["name"]
        dr = next(
            (
                d
                for d in mesh.in_namespace("DestinationRule")
                if mesh.service_for_host(d["spec"]["host"]) is svc
            ),
            None,
        )
        so = next(
            (
                s
                for s in mesh.in_namespace("ScaledObject")
                if s["spec"]["scaleTargetRef"]["name"] == name
            ),
            None,
        )
        if dr is None or so is None:
            continue
        per_replica = int(
            policy["pools"][e["pool"]].get(
                "max_in_flight_per_replica", env["LLMMESH_ORCHESTRATOR_MAX_IN_FLIGHT_PER_REPLICA"]
            )
        )
        need = per_replica * int(so["spec"]["maxReplicaCount"])
        have = int(dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"])
        if have < need:
            problems.append(
                f"{doc_id(dr)}: http2MaxRequests {have} < max_in_flight_per_replica x maxReplicaCount = {need}"
            )
        od = dr["spec"]["trafficPolicy"]["outlierDetection"]
        health = policy["health"]
        pairs = (
            (
                "consecutiveLocalOriginFailures",
                od.get("consecutiveLocalOriginFailures"),
                health["consecutive_errors"],
            ),
            (
                "baseEjectionTime",
                (go_duration_ms(str(od.get("baseEjectionTime"))) or 0) / 1000,
                health["base_ejection_seconds"],
            ),
            ("maxEjectionPercent", od.get("maxEjectionPercent"), health["max_ejection_percent"]),
        )
        for field, mesh_value, policy_value in pairs:
            if mesh_value is None or float(mesh_value) != float(policy_value):
                problems.append(
                    f"{doc_id(dr)}: outlierDetection.{field} {mesh_value} != policy health {policy_value}"
                )
    orch = next(
        (
            d
            for d in mesh.in_namespace("DestinationRule")
            if d["spec"]["host"].startswith("llmmesh-orchestrator.")
        ),
        None,
    )
    if orch is None:
        problems.append("no DestinationRule for llmmesh-orchestrator")
    elif int(orch["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"]) < int(
        env["LLMMESH_ORCHESTRATOR_MAX_QUEUE"]
    ):
        problems.append("orchestrator http2MaxRequests must be >= LLMMESH_ORCHESTRATOR_MAX_QUEUE")
    return problems


def _prestop_seconds(container: Mapping[str, Any]) -> int:
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return int(sleep.get("seconds", 0))


def check_workloads(mesh: Mesh) -> list[str]:
    """Security context, resources, probes, PDBs and shutdown timing of every Deployment."""
    problems: list[str] = []
    refresh = float(orchestrator_env(mesh)["LLMMESH_ORCHESTRATOR_DNS_INTERVAL_S"])
    pdbs = mesh.in_namespace("PodDisruptionBudget")
    service_accounts = {sa["metadata"]["name"] for sa in mesh.in_namespace("ServiceAccount")}
    for dep, tpl in mesh.pod_templates():
        where = doc_id(dep)
        spec = tpl["spec"]
        labels = tpl["metadata"]["labels"]
        if spec.get("serviceAccountName") not in service_accounts:
            problems.append(
                f"{where}: serviceAccountName must be one of this namespace's ServiceAccounts"
            )
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        psc = spec.get("securityContext", {})
        if (
            psc.get("runAsNonRoot") is not True
            or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault"
        ):
            problems.append(
                f"{where}: pod must run as non-root with the RuntimeDefault seccomp profile"
            )
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if (
                sc.get("allowPrivilegeEscalation") is not False
                or sc.get("readOnlyRootFilesystem") is not True
                or sc.get("capabilities", {}).get("drop") != ["ALL"]
            ):
                problems.append(
                    f"{where} {c['name']}: needs no privilege escalation, read-only root, drop ALL"
                )
            res = c.get("resources", {})
            if "cpu" not in res.get("requests", {}) or "memory" not in res.get("limits", {}):
                problems.append(f"{where} {c['name']}: needs a CPU request and a memory limit")
        if not any(labels_match(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs):
            problems.append(f"{where}: no PodDisruptionBudget selects its pods")
        c = spec["containers"][0]
        grace = int(spec.get("terminationGracePeriodSeconds", 30))
        prestop = _prestop_seconds(c)
        if labels.get("app.kubernetes.io/component") == "triton":
            gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            if gpu is None or c["resources"].get("requests", {}).get("nvidia.com/gpu") != gpu:
                problems.append(f"{where}: needs nvidia.com/gpu in requests and limits")
            get = c.get("startupProbe", {}).get("httpGet", {})
            if (
                get.get("path") != "/v2/health/ready"
                or int(get.get("port", 0)) != TRITON_PORTS["http"]
            ):
                problems.append(
                    f"{where}: startupProbe must GET /v2/health/ready on {TRITON_PORTS['http']}"
                )
            # Triton 2.51 answers its health and model-ready routes with 200 while the model's
            # backend is dead: readiness and liveness must run a request through the model, the
            # program the local supervisors' probe applies too (a full queue passes).
            generate = f"127.0.0.1:{TRITON_PORTS['http']}{GENERATE_PROBE_PATH}"
            # The local mesh's supervisor probes its replicas with the liveness numbers
            # (llmmesh.triton.launcher.TRITON_LIVENESS): one home for them.
            probes: tuple[tuple[str, str, LivenessProbe, Literal["pass", "fail"]], ...] = (
                ("readinessProbe", "TRITON_READINESS", TRITON_READINESS, "pass"),
                ("livenessProbe", "TRITON_LIVENESS", TRITON_LIVENESS, "fail"),
            )
            for probe, name, numbers, queued in probes:
                command = c.get(probe, {}).get("exec", {}).get("command", [])
                if command != generate_probe_command(numbers, queued) or generate not in (
                    GENERATE_PROBE_SCRIPT
                ):
                    problems.append(
                        f"{where}: {probe} must run a request through the model: exec "
                        f"llmmesh.triton.launcher.generate_probe_command({name}, {queued!r}) "
                        f"(POST http://{generate} {GENERATE_PROBE_BODY.decode()})"
                    )
                got_probe = c.get(probe, {})
                want = {
                    "periodSeconds": numbers.period_s,
                    "timeoutSeconds": numbers.timeout_s,
                    "failureThreshold": numbers.failure_threshold,
                }
                got = {k: float(got_probe.get(k, -1)) for k in want}
                if got != want:
                    problems.append(
                        f"{where}: {probe} must be llmmesh.triton.launcher.{name} "
                        f"({', '.join(f'{k} {v:g}' for k, v in want.items())}, request "
                        f"timeout={numbers.request_timeout_s:g})"
                    )
            startup = c.get("startupProbe", {})
            if (
                int(startup.get("periodSeconds", 10)) * int(startup.get("failureThreshold", 3))
                < 600
            ):
                problems.append(f"{where}: startupProbe must allow >= 10 minutes of engine loading")
            if "/models" not in {m["mountPath"] for m in c.get("volumeMounts", [])} or not any(
                "persistentVolumeClaim" in v for v in spec.get("volumes", [])
            ):
                problems.append(f"{where}: needs the model repository PVC mounted at /models")
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in spec.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            for claim in claims:
                if mesh.get("PersistentVolumeClaim", claim) is None:
                    problems.append(f"{where}: PersistentVolumeClaim {claim} is not defined")
            exit_timeout = next(
                (
                    int(a.split("=", 1)[1])
                    for a in c.get("args", [])
                    if a.startswith("--exit-timeout-secs=")
                ),
                30,
            )
            if grace < prestop + exit_timeout:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds {grace} < preStop {prestop} + exit timeout {exit_timeout}"
                )
            if prestop < refresh + 10:
                problems.append(
                    f"{where}: preStop {prestop}s must outlast the orchestrator's DNS refresh ({refresh}s) + 10 s"
                )
        elif is_redis(dep):
            pass  # Redis exits at once on SIGTERM (no persistence): nothing to drain
        else:
            env = mesh.container_env(dep, c)
            drain = next((float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")), None)
            if drain is None or grace < prestop + drain + 5:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds {grace} < preStop {prestop} + drain {drain} + 5"
                )
    return problems


def check_gateway_models(mesh: Mesh) -> list[str]:
    """Each gateway serves its model version: Admit asks for LLMMESH_GATEWAY_MODEL_VERSION, the
    tokenizer comes from that version's model repository, the model names its end token, and
    the Triton model exists."""
    problems: list[str] = []
    versions = {
        d["spec"]["template"]["metadata"]["labels"]["version"] for d in triton_deployments(mesh)
    }
    for dep in component_deployments(mesh, GATEWAY):
        tpl = dep["spec"]["template"]
        c = mesh.main_container(dep)
        env = mesh.container_env(dep, c)
        version = tpl["metadata"]["labels"].get("version")
        if env.get("LLMMESH_GATEWAY_MODEL_VERSION") != version:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_GATEWAY_MODEL_VERSION must equal its subset label {version}"
            )
        if version not in versions:
            problems.append(f"{doc_id(dep)}: no Triton pool serves model version {version}")
        shadow = tpl["metadata"]["labels"].get("llmmesh.io/role") == "shadow"
        if env.get("LLMMESH_GATEWAY_SHADOW") != ("true" if shadow else "false"):
            problems.append(f"{doc_id(dep)}: LLMMESH_GATEWAY_SHADOW must be {str(shadow).lower()}")
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in tpl["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for model in json.loads(env.get("LLMMESH_GATEWAY_MODELS", "[]")):
            path = str(model["tokenizer_path"])
            mount = max(
                (m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len, default=None
            )
            claim = claims.get(mounts[mount]) if mount else None
            if claim is None or not claim.endswith(f"-{version}"):
                problems.append(
                    f"{doc_id(dep)}: tokenizer {path} must come from the {version} model repository"
                )
            if "end_id" not in model and "eos_token" not in model:
                # The default EOS text is ChatML's: a tokenizer without it (Llama 3's) stops the
                # gateway at startup.
                problems.append(
                    f"{doc_id(dep)}: model {model.get('name')!r} must set end_id or eos_token "
                    "(its tokenizer's end-of-turn token)"
                )
            triton_model = model.get("triton_model", "tensorrt_llm")
            if not (
                REPO / "model_repository" / "production" / triton_model / "config.pbtxt"
            ).is_file():
                problems.append(
                    f"{doc_id(dep)}: Triton model {triton_model} is not in model_repository/production"
                )
        if not json.loads(env.get("LLMMESH_GATEWAY_MODELS", "[]")):
            problems.append(f"{doc_id(dep)}: LLMMESH_GATEWAY_MODELS is empty")
    return problems


def _replicated(mesh: Mesh, comp: Component, pods: str) -> tuple[list[str], str]:
    """A component with no single point of failure: a headless Service selecting its pods, 2+
    replicas with required anti-affinity on the node, and PDBs that keep one pod (`pods` names
    them in findings). Returns the findings and the Service's DNS target (host:grpc port)."""
    problems: list[str] = []
    name = comp.k8s_object
    svc = require(mesh.get("Service", name), f"Service {name}")
    if svc["spec"].get("clusterIP") != "None":
        problems.append(f"{doc_id(svc)}: must be headless (clients find every {pods} pod)")
    grpc = require(port_by_name(svc["spec"]["ports"], "grpc"), f"port grpc of {name}")
    target = f"{service_host(name, mesh.namespace)}:{grpc['port']}"
    pdbs = mesh.in_namespace("PodDisruptionBudget")
    deps = component_deployments(mesh, comp)
    if not deps:
        problems.append(f"no {name} Deployment")
    for dep in deps:
        replicas = int(dep["spec"].get("replicas", 1))
        if replicas < 2:
            problems.append(f"{doc_id(dep)}: needs replicas >= 2 (has {replicas})")
        tpl = dep["spec"]["template"]
        labels = tpl["metadata"]["labels"]
        if not labels_match(svc["spec"].get("selector", {}), labels):
            problems.append(f"{doc_id(svc)}: must select the pods of {doc_id(dep)}")
        terms = (
            tpl["spec"]
            .get("affinity", {})
            .get("podAntiAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", [])
        )
        if not any(
            t.get("topologyKey") == "kubernetes.io/hostname"
            and labels_match(t.get("labelSelector", {}).get("matchLabels", {}), labels)
            for t in terms
        ):
            problems.append(
                f"{doc_id(dep)}: needs required pod anti-affinity on kubernetes.io/hostname "
                "against its own pods"
            )
        for pdb in pdbs:
            if not labels_match(pdb["spec"]["selector"]["matchLabels"], labels):
                continue
            spec = pdb["spec"]
            keeps = (
                int(spec["minAvailable"])
                if "minAvailable" in spec
                else replicas - int(spec.get("maxUnavailable", replicas))
            )
            if keeps < 1:
                problems.append(f"{doc_id(pdb)}: must keep at least one {pods} pod available")
    return problems, target


def check_kv_registry_replicas(mesh: Mesh) -> list[str]:
    """kv_registry has no single point of failure: 2+ replicas on different nodes, a PDB that
    keeps one, a headless Service, and every engine and the orchestrator find all its pods
    through that Service (KV_REGISTRY_DNS = its host and gRPC port; engines publish to each pod,
    the orchestrator reads from any)."""
    problems, target = _replicated(mesh, KV_REGISTRY, "registry")
    clients = [("llmmesh-orchestrator", "LLMMESH_ORCHESTRATOR_")] + [
        (d["metadata"]["name"], "LLMMESH_EMULATOR_") for d in triton_deployments(mesh)
    ]
    for dep_name, prefix in clients:
        env = env_of(mesh, dep_name)
        if env.get(f"{prefix}KV_REGISTRY_DNS") != target:
            problems.append(
                f"Deployment {dep_name}: {prefix}KV_REGISTRY_DNS must be {target} "
                f"(has {env.get(f'{prefix}KV_REGISTRY_DNS')})"
            )
        for key in (f"{prefix}KV_REGISTRY_ADDRESS", f"{prefix}KV_REGISTRY_ADDRESSES"):
            if key in env:
                problems.append(
                    f"Deployment {dep_name}: {key} names registries past DNS; use KV_REGISTRY_DNS"
                )
    return problems


def check_orchestrator_replicas(mesh: Mesh) -> list[str]:
    """The orchestrator has no single point of failure: 2+ replicas on different nodes, a PDB
    that keeps one, and every gateway finds all its pods through a headless Service
    (GATEWAY_ORCHESTRATOR_DNS = its host and gRPC port): Admit is spread over them, each Complete
    goes to the pod that granted the lease, which a ClusterIP Service cannot do."""
    problems, target = _replicated(mesh, ORCHESTRATOR, "orchestrator")
    for dep in component_deployments(mesh, GATEWAY):
        env = mesh.container_env(dep, mesh.main_container(dep))
        if env.get("LLMMESH_GATEWAY_ORCHESTRATOR_DNS") != target:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_GATEWAY_ORCHESTRATOR_DNS must be {target} "
                f"(has {env.get('LLMMESH_GATEWAY_ORCHESTRATOR_DNS')})"
            )
        if "LLMMESH_GATEWAY_ORCHESTRATOR_ADDRESSES" in env:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_GATEWAY_ORCHESTRATOR_ADDRESSES names orchestrators past "
                "DNS; use ORCHESTRATOR_DNS"
            )
    return problems
