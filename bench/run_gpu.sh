#!/usr/bin/env bash
# On a GPU machine with torch, triton, pytest and pytest-benchmark present: build csrc/, run the
# test suite on the GPU, run every benchmark suite and the demo, writing results (JSON + markdown)
# and logs into OUTDIR, so a short GPU window is spent measuring, not setting up.
#
#   bench/run_gpu.sh OUTDIR [all|test|bench|conditions|edit|demo]...     (default: all)
#
# Each phase builds first (idempotent, ~1 min on a fresh machine). A lent machine allows 10 minutes
# a call and returns at most 8 files, so split a cold start across calls: `test`, then `bench`,
# then `conditions` (Flux-dev with image conditions, 12B random weights), then `edit` (KV-Edit on
# Flux-dev), then `demo`. Files:
# info.txt, build.log, tests.log, bench.log, pytest-benchmark.json, bench-cuda.md, bench-cuda.json,
# demo.txt; conditions/ and edit/ hold those suites' logs, JSON and tables.
set -uo pipefail
OUT=${1:?usage: bench/run_gpu.sh OUTDIR [all|test|bench|conditions|edit|demo]...}
shift
PHASES=${*:-all}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
want() { [[ " $PHASES " == *" all "* || " $PHASES " == *" $1 "* ]]; }

# Wheels brought along in .whl/ (`make wheels`): diffusers, tomesd, a new setuptools.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl > "$OUT/build.log" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Build the CUDA extension against the machine's own torch (hence no build isolation).
start=$(date +%s)
FASTGEN_BUILD_CUDA=${FASTGEN_BUILD_CUDA:-1} "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1 \
  || { echo "build failed (see build.log); continuing without the CUDA extension"; status=1;
       FASTGEN_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
{ nvidia-smi || true; "$PY" -m fastgen.cli info; } > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

if want test; then  # on a GPU every kernel test runs natively, plus the @gpu tests
  "$PY" -m pytest tests -p no:cacheprovider -q -rs --durations=15 2>&1 | tee "$OUT/tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want bench; then  # every suite, timed; fastgen's table lands in OUT/bench-cuda.{md,json}
  "$PY" -m pytest bench -p no:cacheprovider -q --benchmark-json "$OUT/pytest-benchmark.json" \
    --ignore=bench/bench_conditions.py --ignore=bench/bench_edit.py \
    --benchmark-columns=median,iqr,rounds --fastgen-out "$OUT" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want conditions; then  # issue #4: (a) symmetric, (b) asymmetric, (c) cached, (d) cached + compact
  mkdir -p "$OUT/conditions"
  "$PY" -m pytest bench/bench_conditions.py -p no:cacheprovider -q --benchmark-max-time=2 \
    --benchmark-json "$OUT/conditions/pytest-benchmark.json" --fastgen-out "$OUT/conditions" 2>&1 \
    | tee "$OUT/conditions/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want edit; then  # issue #4: KV-Edit per cache option vs a full generation (OOM rows say so)
  mkdir -p "$OUT/edit"
  "$PY" -m pytest bench/bench_edit.py -p no:cacheprovider -q -rxs \
    --benchmark-json "$OUT/edit/pytest-benchmark.json" --fastgen-out "$OUT/edit" 2>&1 | tee "$OUT/edit/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want demo; then  # the main job at its GPU size
  "$PY" -m fastgen.cli demo --quiet 2>&1 | tee "$OUT/demo.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "run_gpu.sh: done (phases: $PHASES; status $status); results in $OUT"
exit $status
