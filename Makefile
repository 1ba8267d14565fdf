# ferkit: `make serve` (main job: the REST API and web page on the bundled model), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# torch is pinned: this version installs from local wheels on the development machines and CI. ferkit does not use
# torchvision; timm (the seed recipe's backbones) brings the torchvision that matches this torch.
TORCH := torch==2.14.1
PORT ?= 8000

.PHONY: install test serve demo bench lint browser clean image image-test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test,download]'
	# The second face detector (MTCNN): its wheel pins an old torch, so it goes in without its dependencies.
	$(PIP) requests && $(PIP) --no-deps facenet-pytorch==2.6.0
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the web-page test (skipped with a reason when it cannot be installed).
browser:
	@bash scripts/ensure_chromium.sh

test: install browser
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/ferkit serve --host 127.0.0.1 --port $(PORT)

demo: install
	$(PY) scripts/make_examples.py examples
	$(VENV)/bin/ferkit predict examples --save-annotated demo-out
	@echo "annotated copies in demo-out/"

bench: install
	$(PY) benchmarks/infer_speed.py
	$(PY) benchmarks/serve_load.py

# The torch-free server image (Containerfile). BASE_IMAGE needs python3 with venv; podman or docker.
IMAGE ?= ferkit:latest
BASE_IMAGE ?= python:3.11-slim
CONTAINER ?= podman --runtime runc
# PIP_CA: a CA bundle for pip inside the build (a TLS-inspecting proxy), passed as a build secret, not stored.
# podman builds OCI images unless told otherwise, and OCI has no HEALTHCHECK: hence --format docker.
PIP_CA ?=
comma := ,
image:
	$(CONTAINER) build $(if $(findstring podman,$(CONTAINER)),--format docker) --build-arg BASE=$(BASE_IMAGE) \
	  $(if $(PIP_CA),--secret id=pip-ca$(comma)src=$(PIP_CA)) -t $(IMAGE) -f Containerfile .

# Builds the image on a Debian bookworm base made with debootstrap (no registry needed), runs it, sends a real photo.
# Slow (minutes), so not part of `make test`.
image-test:
	bash scripts/image_test.sh

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out examples .pytest_cache
