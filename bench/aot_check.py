"""Compile fastgen's Triton kernels for real GPU targets on a machine with no GPU, and report
what the compiler made of them: registers, spills (stack bytes), shared memory, and whether the
matrix products became Hopper ``wgmma`` or Ampere ``mma.sync``.

The interpreter is looser than a GPU (it accepts tiles and types a GPU rejects), and a GPU window
is rare: this catches compile errors and register spills beforehand. The launch arguments are
recorded from the real launchers and specialised the way Triton's JIT does (an int equal to 1
becomes a constant; 16-divisible pointers and ints get divisibility hints), so the compiled code
is the code a GPU would run.

    python bench/aot_check.py                 # table for the autotune configs, sm_90 and sm_80
    python bench/aot_check.py --json out.json
Must run with TRITON_INTERPRET unset (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_check: unset TRITON_INTERPRET (kernels must be JIT functions, not interpreted)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastgen.kernels import attention as A  # noqa: E402
from fastgen.kernels import fp8 as Q  # noqa: E402
from fastgen.kernels import merging as MK  # noqa: E402
from fastgen.kernels import qk_norm_rope as P  # noqa: E402

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
       torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Report:
    kernel: str
    variant: str
    target: str
    config: str
    regs: int
    stack: int  # bytes of per-thread stack: > 0 means register spills
    shared: int
    wgmma: bool
    mma_sync: bool


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, fn):
        self.fn = fn
        self.args = self.kwargs = None

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _specialise(fn, args, constexprs):
    names = fn.arg_names
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _TY[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                consts[name] = 1
                continue
            sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialise {type(a).__name__}")
    for name in consts:
        sig[name] = "constexpr"
    return sig, consts, attrs


def _usage(cubin: bytes) -> tuple[int, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def compile_recorded(name, variant, rec, cc, num_warps, num_stages, overrides) -> Report:
    kw = dict(rec.kwargs)
    kw.pop("num_warps", None)
    kw.pop("num_stages", None)
    kw.update(overrides)
    sig, consts, attrs = _specialise(rec.fn, rec.args, kw)
    k = triton.compile(ASTSource(rec.fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, stack = _usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    cfg = " ".join(f"{k}={v}" for k, v in overrides.items()) + f" warps={num_warps} stages={num_stages}"
    return Report(name, variant, f"sm_{cc}", cfg, regs, stack, k.metadata.shared, "wgmma" in ptx, "mma.sync" in ptx)


def record_attention(B=1, H=24, Nq=4608, Nk=4608, D=128, segments=(1024,), dtype=torch.bfloat16,
                     fp8=False) -> _Recorder:
    # (B, S, H, D) projections seen as (B, H, S, D), as the model patches will pass them
    q = torch.empty(B, Nq, H, D, dtype=dtype).transpose(1, 2)
    k = torch.empty(B, Nk, H, D, dtype=dtype).transpose(1, 2)
    kv = torch.float8_e4m3fn if fp8 else dtype
    segs = [(torch.empty(1, H, n, D, dtype=kv), torch.empty(1, H, n, D, dtype=kv), 0.5,
             torch.empty(1, H, n) if fp8 else None, torch.empty(1, H, n) if fp8 else None) for n in segments]
    rec = _Recorder(A._attn_fwd)
    real, A._attn_fwd = A._attn_fwd, rec
    try:
        out = torch.empty_like(q)
        lse = torch.empty(B, H, Nq, dtype=torch.float32)
        prec = "ieee" if dtype == torch.float32 else None
        A._launch(q, [(k, k, 0.0, None, None)] + segs, D**-0.5, out, lse, prec)
    finally:
        A._attn_fwd = real
    return rec


def record_prologue(B=1, S=4608, H=24, D=128, norm="head", rope="interleaved", dtype=torch.bfloat16) -> _Recorder:
    q = torch.empty(B, S, H, D, dtype=dtype).transpose(1, 2)
    w = torch.empty(D if norm == "head" else H * D, dtype=dtype)
    cos = torch.empty(S, D // 2)
    rec = _Recorder(P._qk_norm_rope_fwd)
    real, P._qk_norm_rope_fwd = P._qk_norm_rope_fwd, rec
    try:
        P.qk_norm_rope_fwd(q, q, w, w, cos, cos, 1e-6, norm, rope, P.empty_like_bshd(q), P.empty_like_bshd(q))
    finally:
        P._qk_norm_rope_fwd = real
    return rec


def record_quantize(B=1, H=24, N=1024, D=128, dtype=torch.bfloat16) -> _Recorder:
    x = torch.empty(B, N, H, D, dtype=dtype).transpose(1, 2)
    rec = _Recorder(Q._quantize_fp8_rows)
    real, Q._quantize_fp8_rows = Q._quantize_fp8_rows, rec
    try:
        Q.quantize_fp8_fwd(x, torch.empty(B, H, N, D, dtype=Q.FP8), torch.empty(B, H, N))
    finally:
        Q._quantize_fp8_rows = real
    return rec


def _recorded(module, name: str, launch) -> _Recorder:
    # the launch of module.<name> that ``launch()`` makes, recorded instead of run
    real = getattr(module, name)
    rec = _Recorder(real)
    setattr(module, name, rec)
    try:
        launch()
    finally:
        setattr(module, name, real)
    return rec


def record_merging(B=2, N=4096, C=320, dtype=torch.bfloat16) -> dict[str, _Recorder]:
    """The token-merging launches (kernels/merging.py) at SD 1.5's level-1 size: matching of N/4 dst
    against 3N/4 src, merge to N/2 rows, unmerge with and without the residual add."""
    x = torch.empty(B, N, C, dtype=dtype)
    src, dst = torch.arange(N // 4, N), torch.arange(N // 4)
    members, row_of = torch.zeros(B, N, dtype=torch.int32), torch.zeros(B, N, dtype=torch.int32)
    offsets = torch.zeros(B, N // 2 + 1, dtype=torch.int32)
    y = torch.empty(B, N // 2, C, dtype=dtype)
    return {"match": _recorded(MK, "_match_kernel", lambda: MK.match_fwd(x, src, dst)),
            "merge": _recorded(MK, "_merge_kernel", lambda: MK.merge_fwd(x, members, offsets)),
            "unmerge": _recorded(MK, "_unmerge_kernel", lambda: MK.unmerge_fwd(y, row_of)),
            "unmerge+residual": _recorded(MK, "_unmerge_kernel", lambda: MK.unmerge_fwd(y, row_of, x))}


def attention_configs() -> list[tuple[dict, int, int]]:
    return [({"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"]}, c.num_warps, c.num_stages)
            for c in A._gpu_configs()]


# "force": constexprs set as the launcher would for inputs too large to allocate here (INT64: some
# tensor spans 2**31 elements or more, e.g. long video).
VARIANTS = {
    "bf16 D128 +1 seg": dict(D=128),
    "fp16 D64 plain": dict(D=64, segments=(), dtype=torch.float16),
    "bf16 D256 +1 seg": dict(D=256),
    "fp16 D80 +4 segs": dict(D=80, segments=(64, 64, 64, 64), dtype=torch.float16),
    "fp32 D64 ieee": dict(D=64, segments=(), dtype=torch.float32),
    "bf16 D128 +1 fp8 seg": dict(D=128, fp8=True),
    "bf16 D128 +1 seg int64": dict(D=128, force={"INT64": True}),
    "bf16 D128 +1 fp8 seg int64": dict(D=128, fp8=True, force={"INT64": True}),
}
PROLOGUE_VARIANTS = {
    "bf16 D128 H24 norm=head": (dict(norm="head"), {}),
    "bf16 D128 H24 norm=all": (dict(norm="all"), {}),
    "bf16 D128 H24 norm=head half in place": (dict(norm="head", rope="half"), {"IN_PLACE": True}),
    "bf16 D128 H24 norm=all int64": (dict(norm="all"), {"INT64": True}),
}


def run(targets=(90, 80), fixed_only=False) -> list[Report]:
    """Every variant x (every autotune config, or only the fixed one) x target, and the prologue."""
    reports = []
    for cc in targets:
        for vname, kw in VARIANTS.items():
            if kw.get("fp8") and cc < 89:
                continue  # e4m3 conversion needs sm_89+: the op dequantizes a copy there instead
            kw = dict(kw)
            force = kw.pop("force", {})
            rec = record_attention(**kw)
            block_d = rec.kwargs["BLOCK_D"]
            if fixed_only:
                bm, bn, w, st = A.fixed_config(block_d, kw.get("dtype", torch.bfloat16), (cc // 10, cc % 10),
                                               kw.get("fp8", False))
                configs = [({"BLOCK_M": bm, "BLOCK_N": bn}, w, st)]
            else:
                configs = [c for c in attention_configs()
                           if c[0]["BLOCK_M"] * block_d <= 128 * 128 and c[0]["BLOCK_N"] * block_d <= 128 * 128]
            for overrides, w, st in configs:
                reports.append(compile_recorded("attention", vname, rec, cc, w, st, {**overrides, **force}))
        for vname, (kw, force) in PROLOGUE_VARIANTS.items():
            rec = record_prologue(**kw)
            w = rec.kwargs.get("num_warps", 4)
            reports.append(compile_recorded("qk_norm_rope", vname, rec, cc, w, 1, force))
        for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for op, rec in record_merging(dtype=dtype).items():
                name = "tome_" + op.split("+")[0]
                reports.append(compile_recorded(name, f"{tag} N4096 C320" + (" +res" if "+" in op else ""), rec, cc, 4,
                                                1, {}))
                if dtype == torch.bfloat16:
                    reports.append(compile_recorded(name, f"{tag} N4096 C320 int64" + (" +res" if "+" in op else ""),
                                                    rec, cc, 4, 1, {"INT64": True}))
        if cc >= 89:
            rec = record_quantize()
            reports.append(compile_recorded("quantize_fp8", "bf16 D128 H24", rec, cc, 4, 1, {}))
            reports.append(compile_recorded("quantize_fp8", "bf16 D128 H24 int64", rec, cc, 4, 1, {"INT64": True}))
    return reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--fixed-only", action="store_true", help="only the config used when autotuning is off")
    ap.add_argument("--targets", default="90,80")
    args = ap.parse_args()
    reports = run(tuple(int(t) for t in args.targets.split(",")), args.fixed_only)
    print("| kernel | variant | target | config | regs | stack B | shared B | wgmma | mma.sync |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |")
    for r in reports:
        print(f"| {r.kernel} | {r.variant} | {r.target} | {r.config} | {r.regs} | {r.stack} | {r.shared} | {r.wgmma} | {r.mma_sync} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
