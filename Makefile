# RLHF Lab — the two set-up commands:
#   make quickstart   the whole loop on the embedded defaults (SmolLM2-135M, CPU, W&B offline)
#   make test         linter + the test suite (installs everything it needs first)
#
# Both create (or reuse) a virtual environment in .venv, install a CPU build of torch first
# (pip takes the local CPU wheel on this kind of machine instead of a multi-GB CUDA download),
# then the lab with every extra and the dev tools, at the exact versions of constraints.txt (the
# lock CI tests; pyproject.toml keeps the supported ranges).

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PRESET  ?= smollm2
ARGS    ?=
PYTEST_ARGS ?=
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test lint format chromium postgres download clean help constraints

help:
	@echo "make quickstart   run the whole loop on the embedded SmolLM2 (PRESET=tiny for the fast preset)"
	@echo "make test         ruff + pytest (installs the venv and Debian's chromium for browser tests)"
	@echo "make download     fetch the embedded base model into the cache (~/.cache/rlhf-lab)"
	@echo "make constraints  re-pin constraints.txt after changing a range in pyproject.toml"
	@echo "make lint | format | clean"

# pip install, tried up to four times: a download cut off mid-file (seen in CI: a 53 MB wheel stuck
# at 27.5 MB through all of pip's own resume attempts) fails the whole install, and a fresh try a
# little later usually gets through. Wheels already downloaded come from pip's cache on the retry.
define pip_install
for attempt in 1 2 3 4; do \
  $(BIN)/python -m pip install -q $(1) && break; \
  if [ $$attempt = 4 ]; then echo "pip install failed four times; giving up" >&2; exit 1; fi; \
  echo "pip install failed (try $$attempt of 4; a download cut off?): trying again in $$((attempt * 20)) s" >&2; \
  sleep $$((attempt * 20)); \
done
endef

# pip compiles every installed module to bytecode one file at a time; compileall does the same on
# every core afterwards (a fresh install on 2 cores: 47 s against 67 s). Its status is ignored: torch
# ships a test helper in Python 3.12 syntax that no 3.11 can compile, as pip's own pass ignores it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(call pip_install,--upgrade pip)
	@$(call pip_install,--no-compile "$(TORCH)")
	@$(call pip_install,--no-compile -c constraints.txt -e ".[dev]")
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $@

install: $(STAMP)

# Browser tests drive Debian's chromium (Playwright cannot download its own browsers here).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "warning: could not install chromium; browser tests will be skipped"; }

# The store's tests also run on PostgreSQL: they start a throwaway server with Debian's binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the store's PostgreSQL tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null \
	  || echo "warning: could not install postgresql; the PostgreSQL store tests will be skipped"; }

# Re-pin after changing a range in pyproject.toml: install without the lock, then freeze.
constraints:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(call pip_install,"$(TORCH)")
	@$(call pip_install,--upgrade -e ".[dev]")
	{ echo "# The exact versions make installs and CI tests (pip -c); pyproject.toml holds the ranges."; \
	  echo "# Regenerate with make constraints. torch is pinned by the Makefile (TORCH)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
	@touch $(STAMP)

download: $(STAMP)
	$(BIN)/rlhf download

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) chromium postgres lint
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(BIN)/rlhf quickstart --preset $(PRESET) $(ARGS)

clean:
	rm -rf runs wandb .pytest_cache .ruff_cache
