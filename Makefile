# The two commands of README.md, on a fresh machine:  make demo   |   make test
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

# torch is installed on its own first, so that pip takes the build that matches the machine
# (and, on the machines this project is built on, the copy that lies on their disk).
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

STAMP := $(VENV)/.wit-installed
# pip lists every local index folder it skips; that noise hides the real messages
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test demo lint clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC) 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, torchvision"
	$(BIN)/pip install -q -c constraints.txt -e ".[test,ray]" 2>&1 | $(QUIET_PIP)
	$(BIN)/wit --version
	touch $@

install: $(STAMP)

# The report's browser test renders it in Debian's chromium; install it when it is missing and
# we can (root with apt), else that one test says why it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
		echo "chromium not installed: the report's browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/pip install -q ruff 2>&1 | $(QUIET_PIP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/wit demo -o $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
