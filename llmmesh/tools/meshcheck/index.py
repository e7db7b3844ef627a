"""`Mesh`: an index over the documents of one rendered overlay, for the rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from llmmesh.tools.meshcheck.common import (
    CLUSTER_DOMAIN,
    MESH,
    NAMESPACE,
    TRUST_DOMAIN,
    Doc,
    MissingObject,
    doc_id,
)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Mesh:
    """The documents of one rendered overlay, and the mesh/ directory it was rendered from (rules
    read its non-Kubernetes files: the istiod values, the scrape jobs, the README)."""

    def __init__(self, docs: list[Doc], root: Path = MESH, namespace: str = NAMESPACE):
        self.docs = docs
        self.root = root
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
                if cm is None:
                    raise MissingObject(
                        f"{doc_id(dep)} envFrom ConfigMap {ref['name']} not rendered"
                    )
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
