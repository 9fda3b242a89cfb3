# biometrics.backup: one entry point for developers and CI. `make help` lists the targets.
#
# Everything runs from the repository itself: the collection is made importable by a
# symlink build/collections/ansible_collections/biometrics/backup -> repo, and
# kubernetes.core comes from the PyPI `ansible` bundle in .venv (Galaxy is not reachable).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
# Two cores are shared by servers, builds and tests: stages run one after another.
.NOTPARALLEL:
MAKEFLAGS += --no-builtin-rules --no-builtin-variables

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))

# Interpreter the virtualenv is created from (Debian 12 machines: pyenv's 3.11).
PYTHON ?= python3.11
VENV := $(ROOT)/.venv
VENV_BIN := $(VENV)/bin
# Written after a successful `pip install`; older than a requirements file => reinstall.
VENV_STAMP := $(VENV)/.requirements-installed
# Exact versions of everything in .venv (`make constraints` regenerates it from the ranges).
CONSTRAINTS := $(ROOT)/constraints.txt

BUILD := $(ROOT)/build
# Collection root for imports, ansible-playbook and ansible-lint: holds the symlink
# ansible_collections/biometrics/backup -> repo (hack/collection-layout.sh link).
COLLECTIONS_DIR := $(BUILD)/collections
# ansible-test wants a real copy (hack/collection-layout.sh copy).
SANITY_COPY := $(BUILD)/sanity/ansible_collections/biometrics/backup
SANITY_PYTHON ?= 3.11

# The bundle's site-packages holds ansible_collections/kubernetes/core. Expanded lazily
# (recursive `=`), because .venv may only exist once `deps` has run.
BUNDLE_SITE_PACKAGES = $(firstword $(wildcard $(VENV)/lib/python3*/site-packages))

PYTEST_ARGS ?=
SANITY_ARGS ?=
# A test path in PYTEST_ARGS (tests/...) replaces the stage's default directory:
# `make integration PYTEST_ARGS=tests/integration/test_servers.py` runs only that file.
pytest_paths = $(if $(filter tests/%,$(PYTEST_ARGS)),,$(1))
# Integration tests spend much of their time waiting on servers, pods and subprocesses: two
# pytest-xdist workers; the tests of the one session cluster share a worker (tests/conftest.py).
# INTEGRATION_WORKERS=0 runs them in this process, one after the other.
INTEGRATION_WORKERS ?= 2

export PATH := $(VENV_BIN):$(PATH)
export ANSIBLE_COLLECTIONS_PATH = $(COLLECTIONS_DIR):$(BUNDLE_SITE_PACKAGES)
export PYTHONDONTWRITEBYTECODE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# CI=true: fixed Hypothesis examples and no example database (see tests/conftest.py).
export HYPOTHESIS_PROFILE ?= $(if $(filter true,$(CI)),ci,dev)

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s:\n", substr($$0, 5)} \
		/^[a-zA-Z_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: PYTHON=$(PYTHON) SANITY_PYTHON=$(SANITY_PYTHON) PYTEST_ARGS='...' SANITY_ARGS='...'"

##@ setup
.PHONY: deps apt venv constraints collections build-kube build-velero
deps: apt venv ## Debian packages (hack/install-deps.sh) and the .venv with pinned requirements

apt: ## only the Debian packages
	bash hack/install-deps.sh

venv: $(VENV_STAMP) ## only .venv, at the versions of constraints.txt (redone when a requirements file changed)

$(VENV_STAMP): requirements.txt requirements-test.txt $(CONSTRAINTS)
	test -x $(VENV_BIN)/python || $(PYTHON) -m venv $(VENV)
	$(VENV_BIN)/python -m pip install --quiet -r requirements-test.txt -c $(CONSTRAINTS)
	touch $@

constraints: ## resolve requirements*.txt afresh in a scratch venv and pin the result in constraints.txt
	rm -rf $(BUILD)/constraints-venv
	$(PYTHON) -m venv $(BUILD)/constraints-venv
	$(BUILD)/constraints-venv/bin/python -m pip install --quiet -r requirements-test.txt
	{ echo '# Exact versions CI installs into .venv: `pip install -r requirements-test.txt -c constraints.txt`.'; \
	  echo '# The ranges live in requirements*.txt; regenerate this file with `make constraints` after changing them.'; \
	  $(BUILD)/constraints-venv/bin/python -m pip freeze; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(BUILD)/constraints-venv

collections: ## build/collections/ansible_collections/biometrics/backup -> repo
	bash hack/collection-layout.sh link

build-kube: ## kube-apiserver + kube-controller-manager from source (cached under ~/.cache)
	bash hack/build-kube.sh

# velero (server + CLI) and velero-plugin-for-aws for the real Velero server of the integration
# tests. Cached by version; cold about 8 minutes on 2 cores, so `test` runs it before integration.
build-velero: ## velero + velero-plugin-for-aws from the Go module proxy (cached under ~/.cache)
	bash hack/build-velero.sh

##@ checks
.PHONY: test sanity lint galaxy-import changelog-lint unit integration
test: deps build-kube sanity lint galaxy-import changelog-lint unit build-velero integration molecule ## everything CI runs, from a fresh machine

sanity: venv ## ansible-test sanity on a copy under build/sanity (no ignore files)
	bash hack/collection-layout.sh copy
	bash hack/collection-layout.sh pip-bootstrap
	cd $(SANITY_COPY) && ansible-test sanity --color no --python $(SANITY_PYTHON) --requirements $(SANITY_ARGS)

# ansible-lint installs the collection it lints into $$HOME/.ansible/collections and keeps
# that copy: a private, fresh HOME stops an old copy from shadowing today's plugins.
lint: venv collections ## ansible-lint, production profile
	rm -rf $(BUILD)/lint-home && mkdir -p $(BUILD)/lint-home
	HOME=$(BUILD)/lint-home ansible-lint --offline --profile production $(if $(filter true,$(CI)),--nocolor)

# galaxy-importer: the checks Galaxy and Automation Hub run on an uploaded tarball (role
# READMEs, ansible-doc, ansible-lint, changelog). It pins other versions than .venv (attrs,
# flake8, ...), so it has a virtualenv of its own at the versions of its requirements file.
GALAXY_IMPORTER_VENV := $(BUILD)/galaxy-importer-venv
GALAXY_IMPORTER_REQUIREMENTS := $(ROOT)/requirements-galaxy-importer.txt
GALAXY_IMPORTER_STAMP := $(GALAXY_IMPORTER_VENV)/.requirements-installed
# What is built and imported (tests/integration/test_packaging.py points them at a copy).
GALAXY_IMPORT_SRC ?= $(ROOT)
GALAXY_IMPORT_DIR ?= $(BUILD)/galaxy-import
# Galaxy installs no dependency before it lints, so ansible-lint inside the importer cannot
# resolve kubernetes.core's modules (`make lint` lints with them). Any other warning fails.
GALAXY_IMPORT_ALLOWED := syntax-check\[unknown-module\]: couldn't resolve module/action 'kubernetes\.core\.

$(GALAXY_IMPORTER_STAMP): $(GALAXY_IMPORTER_REQUIREMENTS)
	test -x $(GALAXY_IMPORTER_VENV)/bin/python || $(PYTHON) -m venv $(GALAXY_IMPORTER_VENV)
	$(GALAXY_IMPORTER_VENV)/bin/python -m pip install --quiet -r $(GALAXY_IMPORTER_REQUIREMENTS)
	touch $@

# ansible-test is off inside the importer (it wants a container; `make sanity` runs it).
galaxy-import: $(GALAXY_IMPORTER_STAMP) ## build the tarball and run galaxy-importer on it, failing on any error or warning
	rm -rf $(GALAXY_IMPORT_DIR) && mkdir -p $(GALAXY_IMPORT_DIR)/home
	$(GALAXY_IMPORTER_VENV)/bin/ansible-galaxy collection build --output-path $(GALAXY_IMPORT_DIR) $(GALAXY_IMPORT_SRC)
	cd $(GALAXY_IMPORT_DIR) && env -u ANSIBLE_COLLECTIONS_PATH HOME=$(GALAXY_IMPORT_DIR)/home \
		PATH=$(GALAXY_IMPORTER_VENV)/bin:/usr/bin:/bin GALAXY_IMPORTER_CONFIG=$(ROOT)/hack/galaxy-importer.cfg \
		$(GALAXY_IMPORTER_VENV)/bin/python -m galaxy_importer.main *.tar.gz 2>&1 | tee $(GALAXY_IMPORT_DIR)/importer.log
	if grep -E '^(ERROR|WARNING|CRITICAL):' $(GALAXY_IMPORT_DIR)/importer.log | grep -Ev "$(GALAXY_IMPORT_ALLOWED)"; then \
		echo "galaxy-import: galaxy-importer reported the problems above" >&2; exit 1; \
	fi

changelog-lint: venv ## antsibull-changelog lint (fragments and changelog.yaml)
	antsibull-changelog lint
	antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml

# pytest's own exit code decides: 5 (nothing collected) fails like any other non-zero code,
# and with CI=true tests/conftest.py fails skipped tests and runs in which nothing passed.
unit: venv collections ## pytest tests/unit
	python -m pytest $(call pytest_paths,tests/unit) $(PYTEST_ARGS)

integration: venv collections ## pytest tests/integration (real servers started by the fixtures)
	python -m pytest $(call pytest_paths,tests/integration) -n $(INTEGRATION_WORKERS) --durations=20 $(PYTEST_ARGS)

##@ run
.PHONY: demo bench cluster-up cluster-down
demo: deps build-kube collections ## the main backup job on embedded defaults (hack/demo.sh), installing what is missing first
	bash hack/demo.sh

bench: venv collections ## benchmarks (bench/run.sh, else each bench/*.py)
	if [[ -f bench/run.sh ]]; then \
		bash bench/run.sh; \
	else \
		shopt -s nullglob; scripts=(bench/*.py); \
		(( $${#scripts[@]} )) || { echo "bench: no bench/run.sh and no bench/*.py" >&2; exit 1; }; \
		for script in "$${scripts[@]}"; do echo "== $$script"; python "$$script"; done; \
	fi

cluster-up: venv build-kube ## start the local cluster: etcd, apiserver, controller manager, scheduler and a node (containerd + kubelet)
	bash hack/control-plane.sh start

cluster-down: ## stop the local cluster (node included: mounts and sysctls restored)
	bash hack/control-plane.sh stop

.PHONY: runner-image
# Cached by content under ~/.cache/biometrics-backup/runner-image: unchanged inputs, no build.
# `hack/runner-image.sh import` puts it into the running node's containerd.
runner-image: ## build the runner image from images/runner/Containerfile with buildah (hack/runner-image.sh)
	bash hack/runner-image.sh build

.PHONY: molecule
# hack/molecule.sh: cluster (unless one runs), runner image imported into the node, the servers
# the pods back up (tests/molecule_servers.py), `molecule reset` + `molecule test`; it stops
# what it started.
molecule: deps build-kube collections ## molecule test (default scenario) on the local cluster: converge, idempotence, the CronJobs run as pods
	bash hack/molecule.sh

##@ housekeeping
.PHONY: clean distclean
clean: ## remove build/ and test output
	rm -rf $(BUILD) tests/output .pytest_cache .hypothesis

distclean: clean ## also remove .venv
	rm -rf $(VENV)
