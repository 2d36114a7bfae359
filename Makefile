# The two set-up commands: `make demo` (main job on the built-in default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (the CPU wheel on disk); the package itself declares torch>=2.2.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= demo-output

.PHONY: demo test install clean

$(BIN)/unetkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev,export,napari,scale]"
	touch $@

install: $(BIN)/unetkit

demo: install
	$(BIN)/unetkit demo --out $(DEMO_OUT) --force

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
