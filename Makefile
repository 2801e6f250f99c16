# Two entry points: `make demo` (set up + run the built-in offline swarm) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test test-all test-slow install install-cluster bench clean apt-lists

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools' editable install prints an informational notice about folders named like the
	@# packages (this flat layout); only that notice is silenced, real warnings still show
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e '.[test,serve]'
	$(PY) scripts/install_torchvision_hook.py
	@touch $@

install: $(VENV)/.installed

# the cluster launchers' engines (--launcher ray|slurm), for the slow suite's cluster tests
$(VENV)/.installed-cluster: $(VENV)/.installed
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e '.[test,serve,ray,ray-serve,slurm]'
	@touch $@

install-cluster: $(VENV)/.installed-cluster

# fashion_mnist comes from a Debian package fetched with `apt-get download` (no root needed), which
# needs package lists; a fresh machine may have none, so fetch them once when we can.
apt-lists:
	@if command -v apt-get >/dev/null && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq; \
	  else echo "note: no apt package lists; fashion_mnist needs 'sudo apt-get update' once"; fi; fi

demo: install apt-lists
	$(PY) launch/run_swarm.py $(DEMO_ARGS)

test: install apt-lists
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install-cluster apt-lists
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5 = no slow test selected

test-all: install-cluster apt-lists
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/perf.py --quick

clean:
	rm -rf $(VENV) *.egg-info
