# Two commands: `make demo` runs the main job on a bundled corpus, `make test` runs the tests.
# Both build .venv first (torch pinned to its CPU build by constraints.txt).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arpipe demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests

.PHONY: demo test
