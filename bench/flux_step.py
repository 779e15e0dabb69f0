"""One Flux-dev 1024^2 denoising step, diffusers vs ``fastgen.patch``, in one run on one device, and
what deciding fastgen's automatic backends cost there.

    python bench/flux_step.py OUT.json [--steps-per-generation 28]

Random weights initialised on the device in bf16 (timing does not depend on their values; no
download). The first patched step runs with an empty decisions file (``FASTGEN_CACHE_DIR`` as the
caller set it, else a fresh temporary folder; bench/run_gpu.sh gives it fresh decisions and Triton
cache folders), so every attention and prologue key of the model is decided in it: ``autotune_ms``
is the time spent deciding (each candidate's first run, where Triton compiles, then the check and
the timing), ``autotune_first_runs_ms`` the first runs alone, and ``autotune_share`` that time over
one generation of ``--steps-per-generation`` patched steps (issue #11 asks under 2% on an H100). On a CPU (``FASTGEN_DRY_RUN=1`` or no GPU) the small Flux config runs
instead: the script's paths, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--steps-per-generation", type=int, default=28, help="Flux-dev's default: 28")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("FASTGEN_CACHE_DIR", tempfile.mkdtemp(prefix="fastgen-flux-step-"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    import fastgen
    from fastgen import benchmarks as B
    from fastgen.benchmarks import denoisers
    from fastgen.benchmarks.core import call_ms, speedup_text
    from fastgen.ops import autotune as tuning

    device = B.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = next(c for c in denoisers.denoiser_cases(device) if c.name.startswith("flux"))
    t = time.perf_counter()
    model = case.build(device, dtype)
    inputs = case.inputs(device, dtype)
    build_s = time.perf_counter() - t
    step = denoisers.denoiser_step(model, inputs, case.forwards_per_step)

    def once() -> float:
        return call_ms(step, device)


    def peak(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)

    ref, base_peak = peak(step)  # also the warm-up
    fastgen.patch(model)
    before, before_first = tuning.TUNER.spent_s, tuning.TUNER.first_run_s
    cold_ms = once()  # decides every key (and compiles what it chose)
    spent_ms = (tuning.TUNER.spent_s - before) * 1e3
    first_ms = (tuning.TUNER.first_run_s - before_first) * 1e3  # of which candidates' first runs (JIT compiles)
    out, fg_peak = peak(step)
    diff = float((out.float() - ref.float()).abs().max())
    base, fast = [], []
    for _ in range(args.repeats):  # interleaved rounds: drift of clocks or load hits both alike
        fastgen.unpatch(model)
        base.append(once())
        fastgen.patch(model)
        fast.append(once())
    fastgen.unpatch(model)
    generation_ms = args.steps_per_generation * statistics.median(fast)
    result = {
        "case": case.name, "device": B.environment(device), "dtype": str(dtype).replace("torch.", ""),
        "build_s": round(build_s, 2),
        "diffusers_ms": statistics.median(base), "diffusers_ms_all": base,
        "fastgen_ms": statistics.median(fast), "fastgen_ms_all": fast,
        "speedup": statistics.median(base) / statistics.median(fast),
        "speedup_text": speedup_text(base, fast),
        "max_diff": diff, "ref_max_abs": float(ref.float().abs().max()),
        "diffusers_peak_mb": base_peak, "fastgen_peak_mb": fg_peak,
        "first_patched_step_ms": cold_ms, "autotune_ms": spent_ms, "autotune_first_runs_ms": first_ms,
        "autotune_share": spent_ms / (generation_ms + spent_ms),
        "autotune_share_without_first_runs": (spent_ms - first_ms) / (generation_ms + spent_ms - first_ms),
        "steps_per_generation": args.steps_per_generation,
        "decisions": [tuning.describe(d) for d in tuning.TUNER.log],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{case.name}: diffusers {result['diffusers_ms']:.1f} ms, fastgen {result['fastgen_ms']:.1f} ms, speed-up "
          f"{result['speedup_text']}, max diff {diff:.3g}; deciding {spent_ms:.0f} ms ({first_ms:.0f} ms of it first "
          f"runs) = {100 * result['autotune_share']:.2f}% of a {args.steps_per_generation}-step generation")
    for line in result["decisions"]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
