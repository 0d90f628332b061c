# Set-up and entry points. `make demo` and `make test` work on a fresh machine with no hub
# access: torch is pinned first so that the CPU build is used where there is no GPU.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SHARED ?= ../shared

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q

.PHONY: install test demo
