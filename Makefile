# fastgen developer entry points. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU machines (development, CI) pin a CPU torch; on a GPU machine run `make setup CONSTRAINTS=`
# to keep the CUDA torch you have (the package itself accepts any torch >= 2.5).
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin

.PHONY: setup demo test bench wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,onnx]"
	touch $@

# The main job: a pipeline unpatched vs fastgen.patch, measured in one run on this machine.
demo: setup
	$(BIN)/fastgen demo

# The whole suite on a CPU: kernels under the Triton interpreter, benchmarks run once as tests.
test: setup
	$(BIN)/python -m pytest -p no:cacheprovider --benchmark-disable $(PYTEST_ARGS)

# Timed benchmarks on this machine; tables and JSON into bench/results/local.
bench: setup
	$(BIN)/python -m pytest bench -p no:cacheprovider --fastgen-out bench/results/local

# The pure-Python wheels a lent GPU machine lacks (it has no network); bench/run_gpu.sh installs
# them from .whl/ (kept out of git by .git/info/exclude), which the device call carries.
wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps -d .whl diffusers==0.42.1 tomesd==0.1.3 importlib_metadata "setuptools>=77"

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/fastgen/_C*.so
