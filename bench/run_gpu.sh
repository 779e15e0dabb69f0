#!/usr/bin/env bash
# One short GPU window, spent measuring: build, check and benchmark fastgen on a lent GPU machine
# (torch, triton, pytest, pytest-benchmark present; diffusers and friends carried as wheels in .whl/,
# from `make wheels`), writing at most 8 files into OUTDIR, summary.md always among them.
#
#   bench/run_gpu.sh OUTDIR [quick|test|bench|conditions|edit|merging|framepack|fractal|demo]... [--dry-run]
#
# quick (the default; within 7 minutes from a bare machine): build csrc/, the GPU kernel tests at
#   reduced parametrization (attention, prologue, fp8, AOT configs; bf16 included), the attention and
#   prologue benchmarks, one Flux-dev 1024^2 step patched vs unpatched (random weights initialised on
#   the device) with the cost of deciding its automatic backends, and summary.md. Files: summary.md,
#   build.log, tests.log, bench.log, pytest-benchmark.json, bench-cuda.json, flux-step.json, autotune.json.
# test | bench | conditions | edit | merging | framepack | fractal | demo: the full test suite, every kernel/denoiser
#   benchmark, the image-condition and KV-Edit suites on Flux-dev, token merging (its kernel tests on the GPU,
#   then per-step time, memory and deviation at real sizes vs unpatched and tomesd, and the matching vs
#   tomesd's at 4096-65536 tokens), FramePack (its kernel tests on the GPU, then time and peak memory of
#   each of 20 sections of the 13B FramePackI2V_HY transformer at 640x608, diffusers vs fastgen, the
#   transformer's output patched vs unpatched, and the low-VRAM mode; FASTGEN_FRAMEPACK_SECTIONS /
#   FASTGEN_FRAMEPACK_STEPS resize it), FractalGen (the block sampler's tests on the GPU, CUDA graphs included,
#   then images per second of the reference vs the block sampler on the ImageNet 64 MAR and ImageNet 256
#   MAR-B / L / H configs, random bf16 weights, batch 1, 16, 256; FASTGEN_FRACTAL_PRESETS / _BATCHES /
#   _TOP_ITERATIONS narrow it, and rows measured before a cut are kept), the demo: one per call, each within
#   7 minutes.
#
# Every stage runs under its own time limit (STAGE_LIMITS below), so summary.md (tables, device,
# versions, commit, what was skipped or cut and why) is written before the device call's limit.
# --dry-run runs the same stages on this CPU with tiny shapes under the Triton interpreter and no
# build, so a script error never costs a GPU window (tests/test_run_gpu.py runs it).
set -uo pipefail
USAGE="usage: bench/run_gpu.sh OUTDIR [quick|test|bench|conditions|edit|merging|framepack|fractal|demo]... [--dry-run]"
OUT=${1:?$USAGE}
shift
case $OUT in -*) echo "run_gpu.sh: the first argument is the output folder, got '$OUT'; $USAGE" >&2; exit 2 ;; esac
DRY=0
PHASES=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY=1; else PHASES+=("$a"); fi
done
[ ${#PHASES[@]} -eq 0 ] && PHASES=(quick)
for ph in "${PHASES[@]}"; do  # a typo must not cost a GPU call
  case $ph in quick|test|bench|conditions|edit|merging|framepack|fractal|demo) ;; *) echo "run_gpu.sh: unknown phase '$ph' (quick test bench conditions edit merging framepack fractal demo)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "run_gpu.sh: cannot use '$OUT' as the output folder" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
STAGES=$(mktemp)  # outside OUT: at most 8 files come back
: > "$STAGES"
want() { [[ " ${PHASES[*]} " == *" $1 "* ]]; }

# Seconds per stage. quick: 20 (wheels) + 15 (GPU probe) + 90 (build) + 20 (fallback install) + 95 (tests)
# + 65 (bench) + 75 (flux) + 15 (summary) = 395, plus at most 2 s of kill grace for each of the 8: under
# 7 minutes (420 s). Every other phase: 20 + 15 + 90 + 20 + 240 + 15 = 400 (merging: 60 + 180, framepack:
# 60 + 180, fractal: 45 + 210), plus grace.
declare -A LIMIT=([wheels]=20 [build]=90 [tests]=95 [bench]=65 [flux]=75 [summary]=15
                  [test]=240 [benchall]=240 [conditions]=240 [edit]=240 [mtests]=60 [merging]=180
                  [ftests]=60 [framepack]=180 [fractests]=45 [fractal]=210 [demo]=200)
for name in "${!LIMIT[@]}"; do  # RUN_GPU_LIMIT_<stage>=SECONDS overrides one (tests cut a stage on purpose)
  # A dry run checks the script's paths on a (maybe busy) CPU, not the GPU's timing: 4x the limits.
  [ "$DRY" = 1 ] && LIMIT[$name]=$(( LIMIT[$name] * 4 ))
  var=RUN_GPU_LIMIT_$name
  [ -n "${!var:-}" ] && LIMIT[$name]=${!var}
done

# stage NAME LOG CMD...: run CMD under NAME's limit, its output into LOG; record the outcome for summary.md
stage() {
  local name=$1 log=$2; shift 2
  local limit=${LIMIT[$name]} t=$(date +%s) rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=2 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t )) s
  case $rc in 0) s=ok ;; 124|137) s="cut at its ${limit} s limit" ;; *) s="failed (exit $rc; see $(basename "$log"))" ;; esac
  echo "$name|$s|$dt" >> "$STAGES"
  echo "   $name: $s in ${dt}s"
  tail -n 3 "$log" | sed 's/^/   | /'
  return $rc
}
skip() { echo "$1|skipped: $2|0" >> "$STAGES"; echo "== $1 skipped: $2"; }

if [ "$DRY" = 1 ]; then
  # This CPU, tiny shapes, kernels under the interpreter: the script's paths, not the GPU's numbers.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" FASTGEN_DRY_RUN=1
  PY=${PYTHON:-$(command -v python)}
  skip wheels "dry run"
  skip build "dry run (csrc/ needs nvcc and a CUDA torch)"
else
  # Wheels brought along in .whl/ (`make wheels`): diffusers, tomesd, a new setuptools.
  if compgen -G ".whl/*.whl" > /dev/null; then
    stage wheels "$OUT/build.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    skip wheels "no .whl/ carried (make wheels): diffusers must already be installed"
  fi
  # The CUDA extension, against the machine's own torch (hence no build isolation), for this GPU's
  # architecture only; if it fails or does not fit its limit, fastgen runs without it (said in summary.md).
  ARCH=${TORCH_CUDA_ARCH_LIST:-$(timeout -k 2 15 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
  if ! stage build "$OUT/build.log" env FASTGEN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    echo "fastgen: csrc/ not built (see above): the CUDA extension is skipped, its tests and rows too" >> "$OUT/build.log"
    # Not a failure of the run: noted as skipped, with the reason in build.log.
    sed -i '$ s/^build|\([^|]*\)|/build|skipped: csrc\/ not built (the build \1), fastgen ran without its CUDA extension|/' "$STAGES"
    FASTGEN_SKIP_CUDA_BUILD=1 timeout -k 2 20 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
  fi
fi
# A decisions file of this run only: every automatic-backend decision is made, timed and kept here.
export FASTGEN_CACHE_DIR="$OUT/.cache"

if want quick; then
  export FASTGEN_QUICK=1  # tests/helpers.py: reduced parametrization (bf16 kept)
  TESTS=(tests/test_attention.py tests/test_prologue.py tests/test_fp8.py tests/test_aot.py)
  if [ "$DRY" = 1 ]; then TESTS+=(-k "bf16_on_interpreter or custom_scale or test_matches_reference"); fi
  stage tests "$OUT/tests.log" "$PY" -m pytest "${TESTS[@]}" -p no:cacheprovider -v -rfEs
  BENCH=(bench/bench_attention.py bench/bench_prologue.py --benchmark-max-time=0.5)
  [ "$DRY" = 1 ] && BENCH+=(--benchmark-max-time=0.001 --benchmark-min-rounds=1 --benchmark-warmup=off)
  stage bench "$OUT/bench.log" "$PY" -m pytest "${BENCH[@]}" -p no:cacheprovider -q \
    --benchmark-json "$OUT/pytest-benchmark.json" --benchmark-columns=median,iqr,rounds --fastgen-out "$OUT"
  # Its own empty decisions and Triton caches: the first patched step pays every decision and compile.
  stage flux "$OUT/bench.log" env FASTGEN_CACHE_DIR="$OUT/.cache-flux" TRITON_CACHE_DIR="$OUT/.triton-flux" \
    "$PY" bench/flux_step.py "$OUT/flux-step.json"
fi
if want test; then
  stage test "$OUT/tests.log" "$PY" -m pytest tests -p no:cacheprovider -q -rs --durations=15
fi
if want bench; then
  stage benchall "$OUT/bench.log" "$PY" -m pytest bench -p no:cacheprovider -q --benchmark-json "$OUT/pytest-benchmark.json" \
    --ignore=bench/bench_conditions.py --ignore=bench/bench_edit.py --ignore=bench/bench_merging.py \
    --ignore=bench/bench_framepack.py --ignore=bench/bench_fractal.py \
    --benchmark-columns=median,iqr,rounds --fastgen-out "$OUT"
fi
if want conditions; then  # (a) symmetric, (b) asymmetric, (c) cached, (d) cached + compact
  stage conditions "$OUT/bench.log" "$PY" -m pytest bench/bench_conditions.py -p no:cacheprovider -q --benchmark-max-time=2 \
    --benchmark-json "$OUT/pytest-benchmark.json" --fastgen-out "$OUT"
fi
if want edit; then  # KV-Edit per cache option vs a full generation (OOM rows say so)
  stage edit "$OUT/bench.log" "$PY" -m pytest bench/bench_edit.py -p no:cacheprovider -q -rxs \
    --benchmark-json "$OUT/pytest-benchmark.json" --fastgen-out "$OUT"
fi
if want merging; then  # the merging kernels on the GPU, then the suite (speed, memory, deviation; vs tomesd)
  stage mtests "$OUT/tests.log" "$PY" -m pytest tests/test_merging_kernels.py tests/test_merging.py -p no:cacheprovider -q -rfEs
  MB=(bench/bench_merging.py)
  [ "$DRY" = 1 ] && MB+=(--benchmark-max-time=0.001 --benchmark-min-rounds=1 --benchmark-warmup=off)
  stage merging "$OUT/bench.log" "$PY" -m pytest "${MB[@]}" -p no:cacheprovider -q -rxs \
    --benchmark-json "$OUT/pytest-benchmark.json" --fastgen-out "$OUT"
fi
if want framepack; then  # the FramePack kernels on the GPU, then the suite (per-section time and memory, low-VRAM)
  FT=(tests/test_framepack_kernels.py)
  [ "$DRY" = 1 ] && FT+=(-k "bad_inputs")
  stage ftests "$OUT/tests.log" "$PY" -m pytest "${FT[@]}" -p no:cacheprovider -v -rfEs
  stage framepack "$OUT/bench.log" "$PY" -m pytest bench/bench_framepack.py -p no:cacheprovider -q -rxs \
    --benchmark-json "$OUT/pytest-benchmark.json" --fastgen-out "$OUT"
fi
if want fractal; then  # block == reference on the GPU (graphs included), then images per second, IN64 MAR first
  FR=(tests/test_fractal_block.py tests/test_fractal_digits.py)
  [ "$DRY" = 1 ] && FR+=(-k "bucketed_layout or seed_words")
  stage fractests "$OUT/tests.log" "$PY" -m pytest "${FR[@]}" -p no:cacheprovider -v -rfEs
  stage fractal "$OUT/bench.log" "$PY" -m pytest bench/bench_fractal.py -p no:cacheprovider -q -rxs \
    --benchmark-json "$OUT/pytest-benchmark.json" --fastgen-out "$OUT"
fi
if want demo; then
  stage demo "$OUT/bench.log" "$PY" -m fastgen.cli demo --quiet
fi

if ! stage summary "$OUT/build.log" "$PY" bench/summarize.py "$OUT" --stages "$STAGES" --phases "${PHASES[*]}" \
    --elapsed $(( $(date +%s) - T0 )) --dry-run "$DRY" --decisions "$FASTGEN_CACHE_DIR" "$OUT/.cache-flux"; then
  { echo "# fastgen GPU check (summary script failed: see build.log)"; echo; echo "| stage | outcome | seconds |"
    echo "|---|---|---|"; sed 's/|/ | /g; s/^/| /; s/$/ |/' "$STAGES"; } > "$OUT/summary.md"
fi
rm -rf "$FASTGEN_CACHE_DIR" "$OUT/.cache-flux" "$OUT/.triton-flux" "$OUT"/bench-*.md
cat "$OUT/summary.md"
echo "run_gpu.sh: ${PHASES[*]} done in $(( $(date +%s) - T0 )) s; results in $OUT"
rc=0
grep -q '^[^|]*|\(failed\|cut at\)' "$STAGES" && rc=1
rm -f "$STAGES"
exit $rc
