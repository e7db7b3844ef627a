"""Hand-written schemas for the kinds with no schema in shared/: Namespace, PersistentVolumeClaim,
KEDA ScaledObject and PrometheusRule. They cover only the fields these manifests use (plus close
relatives), typed; anything else is reported like an unknown field. They are not the upstream CRD
schemas: upstream-only constraints are not checked."""

from __future__ import annotations

from typing import Any

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
