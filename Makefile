# Two entry points: `make demo` (set up + run the built-in offline swarm) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test test-all test-slow install bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch/run_swarm.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5 = no slow test selected

test-all: install
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/perf.py --quick

clean:
	rm -rf $(VENV) *.egg-info
