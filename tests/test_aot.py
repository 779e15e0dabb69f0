"""Compile the Triton kernels for sm_90 and sm_80 without a GPU (bench/aot_check.py) and check
what the compiler made of them: Hopper wgmma / Ampere mma.sync, and no register spills where we
claim none. The interpreter alone is looser than a GPU, and GPU windows are rare. Every autotune
candidate's tiling is checked for correctness too: on a GPU as it runs there, on a CPU under the
interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, KernelSpy, assert_within_pytorch_error, max_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_check.py"), "--fixed-only", "--targets", "90,80",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


def _pick(reports, kernel, target, low_precision=True):
    rows = [r for r in reports if r["kernel"] == kernel and r["target"] == target
            and (not low_precision or not r["variant"].startswith("fp32"))]
    assert rows, f"no {kernel} reports for {target}"
    return rows


def test_attention_uses_wgmma_without_spills_on_sm90(reports):
    for r in _pick(reports, "attention", "sm_90"):
        assert r["wgmma"], f"{r['variant']}: no wgmma on sm_90"
        assert r["stack"] == 0, f"{r['variant']}: {r['stack']} bytes of register spills with {r['config']}"
        assert r["shared"] <= 227 * 1024, f"{r['variant']}: {r['shared']} B of shared memory exceeds an H100 block"


def test_attention_uses_mma_on_sm80(reports):
    for r in _pick(reports, "attention", "sm_80"):
        assert r["mma_sync"], f"{r['variant']}: no mma.sync on sm_80"
        # D = 256 spills a little on Ampere (224 B): bound it so a regression shows
        assert r["stack"] <= 256, f"{r['variant']}: {r['stack']} bytes of spills with {r['config']}"
        assert r["shared"] <= 163 * 1024


def test_prologue_compiles_without_spills(reports):
    for target in ("sm_90", "sm_80"):
        for r in _pick(reports, "qk_norm_rope", target):
            assert r["stack"] == 0, f"{r['variant']} on {target} spills"


def test_fp8_kernels_compile_for_sm90(reports):
    fp8 = [r for r in _pick(reports, "attention", "sm_90") if "fp8" in r["variant"]]
    assert fp8 and all(r["wgmma"] and r["stack"] == 0 for r in fp8), fp8
    for r in _pick(reports, "quantize_fp8", "sm_90"):
        assert r["stack"] == 0


def test_token_merging_kernels_compile_for_sm90_and_sm80(reports):
    # the matching's similarity tiles run on the tensor cores (wgmma on Hopper, mma on Ampere);
    # merge and unmerge are gathers: no spills anywhere, fp32 included
    for target in ("sm_90", "sm_80"):
        for kernel in ("tome_match", "tome_merge", "tome_unmerge"):
            rows = _pick(reports, kernel, target, low_precision=False)
            assert len(rows) >= 3, rows
            for r in rows:
                assert r["stack"] <= (8 if target == "sm_80" else 0), f"{kernel} {r['variant']} on {target} spills"
    low = _pick(reports, "tome_match", "sm_90") + _pick(reports, "tome_match", "sm_80")
    assert all(r["wgmma"] if r["target"] == "sm_90" else r["mma_sync"] for r in low), low


# (dtype, D, fp8 segment): bf16 is wrong under the interpreter, so a CPU checks the same tilings in fp16
CONFIG_CASES = [(torch.bfloat16, 128, False), (torch.float16, 80, False), (torch.bfloat16, 256, False),
                (torch.bfloat16, 128, True)]


@pytest.mark.parametrize("dtype,D,fp8", CONFIG_CASES, ids=str)
def test_every_autotune_config_is_correct(dtype, D, fp8, monkeypatch):
    # Each candidate the autotuner may pick for this head dim (the same pruning), forced through
    # _launch: on a GPU with its warps and stages, on a CPU its tiles under the interpreter, at sizes
    # that still leave a tail tile of queries and keys for every config.
    import fastgen
    from fastgen.kernels import attention as A
    from fastgen.ops import quantize_kv

    on_gpu = DEVICE.type == "cuda"
    if fp8 and on_gpu and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversion in registers needs sm_89+ (the op dequantizes a copy there)")
    dtype = dtype if on_gpu else torch.float16
    (B, H), (nq, nk, nc) = ((2, 3), (300, 257, 129)) if on_gpu else ((1, 1), (130, 70, 40))
    g = torch.Generator().manual_seed(D)
    q, k, v, ck, cv = (torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype) for n in (nq, nk, nk, nc, nc))
    if fp8:
        e = quantize_kv(ck, cv, backend="torch")
        segment, plain, ref_pair = (e.k, e.v, 0.5, e.k_scale, e.v_scale), e.dequantize(dtype), e.dequantize(torch.float64)
    else:
        segment, plain, ref_pair = (ck, cv, 0.5, None, None), (ck, cv), (ck, cv)
    ref, ref_lse = A.attention_reference(q, k, v, [ref_pair], [0.5])
    pytorch = fastgen.ops.attention(q, k, v, extra_kv=[plain], extra_bias=0.5, backend="sdpa")
    configs = A._prune_configs(A._gpu_configs(), {}, BLOCK_D=max(16, A.next_pow2(D)))
    assert configs
    spy = KernelSpy(A._attn_fwd)
    monkeypatch.setattr(A, "_attn_fwd", spy)
    for c in configs:
        cfg = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((B, H, nq), float("nan"), device=DEVICE)
        A._launch(q, [(k, v, 0.0, None, None), segment], D**-0.5, out, lse, None, config=cfg)
        assert (spy.launches[-1]["BLOCK_M"], spy.launches[-1]["BLOCK_N"]) == cfg[:2], "the forced tiles must run"
        assert_within_pytorch_error(out, ref, pytorch, what=f"{dtype} D={D} fp8={fp8} config {cfg}")
        assert max_err(lse, ref_lse) < 2e-3, f"lse with config {cfg}"
