# The llmmesh image (Containerfile at the root; mesh/README.md, "The image"). Included by the
# top-level Makefile. Not part of `make test`: both targets need root (buildah --isolation
# chroot) and minutes.
#   make image        ~1.5 min from scratch (base ~30-60 s, image ~45 s), seconds when cached
#   make image-test   ~25 s
# The tag comes from one place, pyproject's [project] version; mesh/base/kustomization.yaml's
# `images:` newTag must equal it (checked here and by tests/mesh/test_image.py).
IMAGE_REPO ?= ghcr.io/llmmesh/llmmesh
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml | head -n 1)
IMAGE := $(IMAGE_REPO):$(IMAGE_VERSION)
# No registry is reachable here, so the base is made from Debian packages (mmdebstrap bookworm
# minbase + python3, Python 3.11 like the official image). Where a registry is reachable:
#   make image BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
# (the Containerfile's own default); the Containerfile is the same either way.
IMAGE_LOCAL_BASE := localhost/llmmesh-base:bookworm-python3.11
BASE_IMAGE ?= $(IMAGE_LOCAL_BASE)
BUILDAH_DEB := buildah=1.28.2+ds1-3+deb12u1+b3
MMDEBSTRAP_DEB := mmdebstrap=1.3.5-7
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# The host's CA bundle, mounted read-only into the build's RUN steps only (pip behind a TLS
# proxy); never part of an image layer. Empty: the base image's own bundle.
IMAGE_BUILD_CA ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
IMAGE_REVISION = $(shell git rev-parse HEAD)$(shell git diff --quiet HEAD -- Containerfile .containerignore constraints.txt pyproject.toml protos llmmesh services 2>/dev/null || echo -dirty)

.PHONY: image image-base image-test image-tools

# buildah and mmdebstrap, Debian's packages at pinned versions (idempotent: nothing to do when
# those versions are installed).
$(STAMPS)/image-tools: mesh/image.mk
	@mkdir -p $(STAMPS)
	@if [ "$$(dpkg-query -W -f='$${Version}' buildah 2>/dev/null)" != "$(word 2,$(subst =, ,$(BUILDAH_DEB)))" ] || \
	    [ "$$(dpkg-query -W -f='$${Version}' mmdebstrap 2>/dev/null)" != "$(word 2,$(subst =, ,$(MMDEBSTRAP_DEB)))" ]; then \
		echo "apt-get install $(BUILDAH_DEB) $(MMDEBSTRAP_DEB)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$(BUILDAH_DEB)" "$(MMDEBSTRAP_DEB)"; \
	fi
	buildah --version && mmdebstrap --version
	@touch $@

image-tools: $(STAMPS)/image-tools ## Install buildah and mmdebstrap (Debian packages, pinned; root)

# The local base: bookworm minbase + python3 (+ venv for the builder stage, CA certificates),
# merged /usr without the usrmerge package (and so without perl), no docs, apt lists or caches.
# Built once; `buildah rmi $(IMAGE_LOCAL_BASE)` makes the next `make image` rebuild it.
image-base: $(STAMPS)/image-tools ## Build the local Debian base image (mmdebstrap; once)
	@if buildah inspect --type image $(IMAGE_LOCAL_BASE) >/dev/null 2>&1; then \
		echo "base $(IMAGE_LOCAL_BASE) present"; \
	else \
		set -e; mkdir -p .build/image; rm -f .build/image/base.tar; \
		mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
			--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
			--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
			--dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
			--aptopt='Acquire::Languages "none"' \
			--customize-hook='rm -rf "$$1"/var/lib/apt/lists/* "$$1"/var/cache/apt/* "$$1"/var/log/apt/* "$$1"/var/log/dpkg.log' \
			bookworm .build/image/base.tar "$(DEBIAN_MIRROR)" \
			"$(DEBIAN_MIRROR) bookworm-updates main" "$(DEBIAN_MIRROR)-security bookworm-security main"; \
		ctr=$$(buildah from scratch); \
		buildah add --quiet $$ctr .build/image/base.tar / >/dev/null; \
		buildah config --env LANG=C.UTF-8 --cmd '["python3"]' \
			--label org.opencontainers.image.description="Debian bookworm minbase + python3 (mmdebstrap)" $$ctr; \
		buildah commit --quiet --rm $$ctr $(IMAGE_LOCAL_BASE) >/dev/null; \
		rm -f .build/image/base.tar; \
		echo "base $(IMAGE_LOCAL_BASE): $$(buildah images --format '{{.Size}}' $(IMAGE_LOCAL_BASE))"; \
	fi

image: $(STAMPS)/image-tools $(if $(filter $(IMAGE_LOCAL_BASE),$(BASE_IMAGE)),image-base) ## Build the llmmesh image with buildah (tag = package version; root)
	@$(PYTHON_BOOT) -m llmmesh.tools.imagetag --repo $(IMAGE_REPO)
	buildah bud --isolation chroot --layers -f Containerfile \
		$(if $(IMAGE_BUILD_CA),-v $(IMAGE_BUILD_CA):/etc/ssl/certs/ca-certificates.crt:ro) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(IMAGE_VERSION) \
		--build-arg REVISION=$(IMAGE_REVISION) -t $(IMAGE) .
	@echo "$(IMAGE): $$(buildah images --format '{{.Size}}' $(IMAGE)) uncompressed (make image-test also reports the compressed size)"
	@echo "Push it (where a registry is reachable):"
	@echo "  buildah login ghcr.io && buildah push $(IMAGE) docker://$(IMAGE)"
	@echo "The manifests name it through mesh/base/kustomization.yaml (images: newTag $(IMAGE_VERSION))."

image-test: setup ## Run the four services from the image against emulator Triton replicas (root; ~25 s)
	@buildah inspect --type image $(IMAGE) >/dev/null 2>&1 || { echo "no image $(IMAGE): make image first"; exit 1; }
	$(PY) -m llmmesh.imagetest --image $(IMAGE)
