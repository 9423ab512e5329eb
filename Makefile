# hpcckpt developer entry points.  From a fresh clone:
#     make test        # creates .venv (MPICH wheel included), runs all test stages
#     make demo        # 4-rank end-to-end demo
# Only python3 (with venv) and a C compiler are needed: the `mpich` wheel provides
# libmpi and $(VENV)/bin/mpiexec, so no system MPI is used.

VENV ?= .venv
PY = $(VENV)/bin/python
PYTHON3 ?= python3
DEMO_DIR ?=

.PHONY: venv demo test bench clean distclean

$(VENV)/.installed: pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -U pip
	$(PY) -m pip install -e '.[test,bench]'
	@test -x $(VENV)/bin/mpiexec || { echo "error: $(VENV)/bin/mpiexec missing (the mpich wheel did not install it)" >&2; exit 1; }
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m hpcckpt.demo --ranks 4 --workdir $(or $(DEMO_DIR),/tmp/hpcckpt-demo)

test: $(VENV)/.installed
	$(PY) tests/run_all.py

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

# Build outputs and caches; keeps the venv.
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Back to a fresh clone: also removes the venv.
distclean: clean
	rm -rf $(VENV)
