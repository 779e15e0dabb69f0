# fastgen developer entry points. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU machines (development, CI) pin a CPU torch; on a GPU machine run `make setup CONSTRAINTS=`
# to keep the CUDA torch you have (the package itself accepts any torch >= 2.5).
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
# Test processes (pytest-xdist): CI machines have 2 cores, and every test runs torch on one thread.
# Whole files go to one worker (--dist loadfile), so module-scoped fixtures (exports) run once.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench wheels check-csrc clean

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
	$(BIN)/python -m pytest -p no:cacheprovider --benchmark-disable -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# diffusers' own model tests for the six supported denoisers, unpatched, then with every model patched
# (default path, kernel path), listing the tests patching breaks (tools/diffusers_suite/README.md). Not
# part of `make test`: it needs a checkout of diffusers' tests at the installed version, which CI cannot
# fetch. make diffusers-suite DIFFUSERS_TESTS=/path/to/diffusers SUITE_ARGS="--modes unpatched,default"
DIFFUSERS_TESTS ?= build/diffusers-tests
.PHONY: diffusers-suite
diffusers-suite: setup
	$(BIN)/python tools/diffusers_suite/run.py --tests $(DIFFUSERS_TESTS) $(SUITE_ARGS)

# Timed benchmarks on this machine; tables and JSON into bench/results/local.
bench: setup
	$(BIN)/python -m pytest bench -p no:cacheprovider --fastgen-out bench/results/local

# The pure-Python wheels a lent GPU machine lacks (it has no network); bench/run_gpu.sh installs
# them from .whl/ (kept out of git by .git/info/exclude), which the device call carries.
wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps -d .whl diffusers==0.42.1 tomesd==0.1.3 importlib_metadata "setuptools>=77"

# Compile-only check of all of csrc/ on a machine without a GPU: the torch-free kernels with nvcc,
# and the torch binding with g++ against the headers of the CUDA torch the GPU machines run
# (extracted from its wheel; nothing installed). Catches build errors before a short GPU window.
TORCH_CUDA_WHEEL ?= torch==2.11.0
CSRC_CACHE ?= build/csrc-check
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda /usr/local/cuda-*))
check-csrc:
	mkdir -p $(CSRC_CACHE)
	test -d $(CSRC_CACHE)/torch/include || { $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
		--platform manylinux_2_28_x86_64 --python-version 3.12 -d $(CSRC_CACHE) "$(TORCH_CUDA_WHEEL)" && \
		$(PYTHON) -c "import glob, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/torch-*.whl')[0]); \
		z.extractall(sys.argv[1], [n for n in z.namelist() if n.startswith('torch/include/')])" $(CSRC_CACHE) && rm $(CSRC_CACHE)/torch-*.whl; }
	for f in csrc/*.cu; do $(CUDA_HOME)/bin/nvcc -c $$f -o $(CSRC_CACHE)/$$(basename $$f).o -std=c++17 -O3 -Icsrc \
		-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a || exit 1; done
	g++ -std=c++17 -O1 -fPIC -c csrc/binding.cpp -o $(CSRC_CACHE)/binding.o -Icsrc -I$(CUDA_HOME)/include \
		-I$(CSRC_CACHE)/torch/include -I$(CSRC_CACHE)/torch/include/torch/csrc/api/include \
		-I$$($(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['include'])") \
		-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
	@echo "csrc/: kernels and binding compile against $(TORCH_CUDA_WHEEL) (CUDA headers from $(CUDA_HOME))"

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/fastgen/_C*.so
