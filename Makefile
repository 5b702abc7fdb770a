# The two commands of README.md: `make demo` (main job) and `make test` (full test suite).
# Both set up the project-local venv first (tools/setup_env.sh; a no-op when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test

setup:
	@bash tools/setup_env.sh

demo: setup
	@bash tools/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
