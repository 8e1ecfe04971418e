# The two commands: `make demo` and `make test`. Each creates .venv when missing and
# installs everything the project needs from its own files (torch pinned for installs
# here by constraints.txt: a CPU build pip takes from local disk).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= serve,dev,triton,redis
STAMP  := $(VENV)/.ugsep-installed
# tritonserver's Python backend runs in its own venv from the system python3.11 (numpy<2):
# see runtime/triton/env.py. The Triton tests use it from here.
TRITON_VENV ?= .venv-triton
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: demo test install lint bench bench-quick clean system-deps

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || { echo ">> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> installing ugsep[$(EXTRAS)] into $(VENV) (torch pinned by constraints.txt)"
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	@echo ">> preparing the tritonserver Python-backend env in $(TRITON_VENV)"
	$(BIN)/python -m runtime.triton.env --venv $(TRITON_VENV)
	@$(MAKE) --no-print-directory system-deps
	@touch $@

# Headless Chromium renders the parity HTML report in its test. Installed from Debian's
# packages when missing and we are root (CI); otherwise say what to do.
system-deps:
	@if command -v chromium >/dev/null 2>&1 || [ -n "$$UGSEP_CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">> installing chromium (Debian package) for the HTML report test"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)) \
	  || { echo "!! could not install chromium"; exit 1; }; \
	else echo "!! no chromium: install it (apt-get install chromium) or set UGSEP_CHROMIUM"; fi
	@# redis-server + redis-cli: the embedding-tier tests start their own Redis Cluster
	@if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">> installing redis-server, redis-tools (Debian packages) for the embedding-tier tests"; \
	  (apt-get install -y -qq redis-server redis-tools >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq redis-server redis-tools >/dev/null)) \
	  || { echo "!! could not install redis-server"; exit 1; }; \
	else echo "!! no redis-server: apt-get install redis-server redis-tools (the Redis tier tests skip)"; fi

demo: $(STAMP)
	$(BIN)/ugsep demo

test: $(STAMP)
	UGSEP_TRITON_VENV=$(abspath $(TRITON_VENV)) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check exporter graph_passes runtime students tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info .pytest_cache
