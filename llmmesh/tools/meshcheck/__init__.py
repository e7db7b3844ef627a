"""meshcheck: the linter for the Kubernetes/Istio manifests under mesh/.

`python -m llmmesh.tools.meshcheck` (`make mesh-test`) runs it; tests/mesh tests it through the
modules below.

- `common`: paths, render targets, findings, errors, Go durations.
- `render`: kubectl and shared/schemas discovery, `kubectl kustomize`.
- `schemas`, `basic_schemas`: schema validation (Kubernetes, Istio CRDs with CEL, hand-written).
- `index`: `Mesh`, an index over one rendered overlay.
- `project`: facts from protos/, docs/conventions.md, metric_names and the settings classes.
- `rules`: the consistency rules by topic, and their registry.
- `runner`: everything over a mesh/ directory, as a `Report`; `__main__`: the CLI.
"""
