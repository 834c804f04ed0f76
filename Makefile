# PSViT-NAS: every entry point goes through the project venv. `make help` lists the targets.

PYTHON ?= python3
PY := .venv/bin/python
PIP := $(PY) -m pip
# Pinned first so `pip install -e .` finds torch>=2.3 already satisfied and downloads no other build. The standard
# build runs on CPU and CUDA; torchvision must be the release made for it (image folders, the DeiT recipe).
# Another build: make install TORCH_REQ="torch==X torchvision==Y --index-url <wheel index>"
TORCH_REQ ?= torch==2.14.1 torchvision==0.29.1
# Hydra overrides passed through to the apps, e.g. make supernet ARGS="space=fmnist_1d train.epochs=2"
ARGS ?=
PYTEST_ARGS ?=
# pytest worker processes (pytest-xdist), each given whole test files, one intra-op thread each (the tests' own
# processes too); TEST_WORKERS=0 runs the suite in this one process
TEST_WORKERS ?= 2
# Architecture JSON for `make retrain`.
ARCH ?=
# One worker per visible GPU; 1 on CPU-only machines. CUDA_VISIBLE_DEVICES, when set, wins over nvidia-smi (set
# empty or to -1 it hides every GPU, as for CUDA itself: one worker).
NPROC ?= $(shell \
	if [ "$${CUDA_VISIBLE_DEVICES+set}" = set ]; then \
	  case "$$CUDA_VISIBLE_DEVICES" in (-*) n=0;; (*) n=$$(echo "$$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '[^ ]');; esac; \
	  [ "$$n" -gt 0 ] && echo $$n || echo 1; \
	elif n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$$n" -gt 0 ]; then echo $$n; \
	else echo 1; fi)

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# A new package directory must reach the editable install's import map, so it re-triggers the install.
PKG_INITS := $(wildcard space/__init__.py supernet/__init__.py supernet/*/__init__.py search/__init__.py)

.DEFAULT_GOAL := help
.PHONY: FORCE help install data test lint info supernet search fidelity retrain latency bench gpu-check demo docs clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 14

install: .venv/.installed data ## create .venv and install the package with the dev extra (no-op when up to date)

# The torch requirement is part of what is installed: a stamp rewritten only when TORCH_REQ changes, so that
# `make install TORCH_REQ=<a CUDA build>` after an install of another build reinstalls.
.venv/.torch-req: FORCE
	@mkdir -p .venv; echo '$(TORCH_REQ)' | cmp -s - $@ || echo '$(TORCH_REQ)' > $@

# The package's dependencies are resolved with torch and torchvision pinned (their `name==version` tokens of
# TORCH_REQ as pip constraints), so no extra (timm, torchvision) can replace the chosen build.
.venv/.installed: setup.cfg pyproject.toml Makefile $(PKG_INITS) .venv/.torch-req
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PIP) install $(TORCH_REQ)
	for t in $(TORCH_REQ); do case $$t in *==*) echo $$t;; esac; done > .venv/torch-constraints.txt
	$(PIP) install -c .venv/torch-constraints.txt -e '.[dev,imagenet,export]'
	touch $@

data: ## make sure Fashion-MNIST is in /usr/share/datasets (Debian package); never fails
	@if [ -f $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then \
	   $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi; \
	[ -f $(FMNIST) ] || echo "make data: Fashion-MNIST not found at $(FMNIST); install the Debian package dataset-fashion-mnist (as root) or pass data.root=DIR to the apps" >&2

test: install ## run the test suite (PYTEST_ARGS / ARGS go to pytest)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) $(ARGS)

lint: install ## ruff over the code and tests
	$(PY) -m ruff check space supernet search bench scripts tests

info: install ## print a search-space summary: size, params/MACs range (make info ARGS="space=fmnist_2d")
	$(PY) -m space.info $(ARGS)

supernet: install ## train the SPOS supernet with torchrun on NPROC workers
	$(PY) -m supernet.engine.launch --standalone --nproc_per_node=$(NPROC) -m supernet.train $(ARGS)

search: install ## evolutionary search over the trained supernet, candidates split over NPROC workers
	$(PY) -m supernet.engine.launch --standalone --nproc_per_node=$(NPROC) -m search.evolve $(ARGS)

fidelity: install ## ranking fidelity of a supernet vs training from scratch (make fidelity ARGS="checkpoint=...")
	$(PY) -m supernet.engine.launch --standalone --nproc_per_node=$(NPROC) -m search.fidelity $(ARGS)

retrain: install ## train an exported architecture from scratch on NPROC workers (make retrain ARCH=arch.json)
	@test -n "$(ARCH)" || { echo "make retrain: set ARCH=path/to/arch.json" >&2; exit 1; }
	$(PY) -m supernet.engine.launch --standalone --nproc_per_node=$(NPROC) -m supernet.retrain arch=$(ARCH) $(ARGS)

latency: install ## measure a space's latency lookup table here (make latency ARGS="space=fmnist_2d out=lat.json")
	$(PY) -m supernet.latency $(ARGS)

.PHONY: export
export: install ## an architecture as a checked ONNX / TorchScript file (make export ARCH=arch.json ARGS="checkpoint=...")
	@test -n "$(ARCH)" || { echo "make export: set ARCH=path/to/arch.json" >&2; exit 1; }
	$(PY) -m supernet.export arch=$(ARCH) $(ARGS)

bench: install ## benchmarks printing side-by-side ratios, also written to runs/bench/*.json (ARGS=quick: the short run)
	$(PY) -m bench $(ARGS)

gpu-check: install ## CUDA at steady state: supernet vs extracted per MAC, PSViT vs timm DeiT-Ti, profile (one line without CUDA)
	$(PY) -m bench.gpu_check $(ARGS)

demo: install ## end to end on Fashion-MNIST: supernet, search, retrain
	$(PY) scripts/demo.py $(ARGS)

docs: install ## render the docs' measurement tables from the JSON under docs/data (scripts/docs.py)
	$(PY) scripts/docs.py render

clean: ## remove build and test artefacts (keeps .venv and experiment outputs)
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf .venv
