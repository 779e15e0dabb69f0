#!/usr/bin/env bash
# On a GPU machine with torch, triton, pytest and pytest-benchmark present (diffusers may come on
# PYTHONPATH): build csrc/, run the test suite on the GPU, run every benchmark suite, and write
# results (JSON + markdown) and logs into OUTDIR. Nothing else to set up, so a short GPU window
# is spent measuring. Usage: bench/run_gpu.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bench/run_gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1

# 0. Wheels brought along in .whl/ (`make wheels`): diffusers, tomesd, a new setuptools.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl > "$OUT/build.log" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. Build the CUDA extension against the machine's own torch (hence no build isolation).
start=$(date +%s)
FASTGEN_BUILD_CUDA=${FASTGEN_BUILD_CUDA:-1} "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1 \
  || { echo "build failed (see build.log); continuing without the CUDA extension"; status=1;
       FASTGEN_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
"$PY" -m fastgen.cli info 2>&1 | tee "$OUT/info.txt"

# 2. The test suite: on a GPU every kernel test runs natively, plus the @gpu tests.
"$PY" -m pytest tests -p no:cacheprovider -q -rs --durations=15 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 3. Every benchmark suite, timed; fastgen's table lands in OUT/bench-cuda.{md,json}.
"$PY" -m pytest bench -p no:cacheprovider -q --benchmark-json "$OUT/pytest-benchmark.json" \
  --benchmark-columns=median,iqr,rounds --fastgen-out "$OUT" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "run_gpu.sh: done (status $status); results in $OUT"
exit $status
