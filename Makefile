# Two commands do everything on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# uv resolves and installs the CUDA torch wheels in seconds where pip takes minutes; pip's own
# site config here also points at a CPU-only torch that breaks torchvision, which uv ignores.
UV     := $(PYTHON) -m uv

.PHONY: install demo lint test test-fast bench bench-scale bench-index bench-finetune bench-gpu gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(UV) venv -q --allow-existing --python $(PYTHON) $(VENV)
	# --compile-bytecode: every Ray worker imports torch and open_clip; without .pyc files (uv writes
	# none by default, and PYTHONDONTWRITEBYTECODE stops Python writing them) each one compiles them
	# from source again, a CPU cost paid in every process.
	UV_HTTP_TIMEOUT=300 $(UV) pip install -q --compile-bytecode -p $(BIN)/python -e '.[test]'
	# The report test drives the system Chromium (never a browser download); Debian's package.
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium not installed; the report's browser test will say so"
	touch $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo

lint: install
	$(BIN)/ruff check .

# Lint first: a lint failure fails make test before pytest starts.
test: install lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python -m bench.bench_decode
	$(BIN)/python -m bench.run_cpu
	$(BIN)/python -m bench.bench_feed
	$(BIN)/python -m bench.bench_dedup

bench-scale: install
	$(BIN)/python -m bench.bench_scale

bench-index: install
	$(BIN)/python -m bench.bench_index

bench-finetune: install
	$(BIN)/python -m bench.bench_finetune --compare

bench-gpu: install
	$(BIN)/python -m bench.run_gpu

# The GPU check without Ray, for a machine with only torch: bench/gpu_check.sh installs the wheels it
# carries (bench/gpu_wheels/, from `bash bench/gpu_check.sh --prepare`) and runs bench.gpu_check.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf demo-output bench-output .pytest_cache
