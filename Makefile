# Two commands do everything on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# uv resolves and installs the CUDA torch wheels in seconds where pip takes minutes; pip's own
# site config here also points at a CPU-only torch that breaks torchvision, which uv ignores.
UV     := $(PYTHON) -m uv

.PHONY: install demo test test-fast bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(UV) venv -q --allow-existing --python $(PYTHON) $(VENV)
	UV_HTTP_TIMEOUT=300 $(UV) pip install -q -p $(BIN)/python -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python -m bench.run_cpu

bench-gpu: install
	$(BIN)/python -m bench.run_gpu

clean:
	rm -rf demo-output bench-output .pytest_cache
