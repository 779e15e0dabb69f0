"""Token merging (issue #12): time per denoising step of each model unpatched, with fastgen's exact
patch alone, with tomesd (UNets) and fastgen ToMe at each ratio (no random dst, so both merge the
same tokens: their deviations must agree), and with fastgen ToDo x2; each row carries its output's
deviation from unpatched. Then fastgen's matching against tomesd's at 64^2, 128^2 (and on a GPU
256^2) tokens. Real configs with random weights on a GPU; small stand-ins on a CPU. SD 1.5 at 512 px
on a CPU takes minutes a row here: ``python -m fastgen.benchmarks.merging --only sd15`` measures it
in interleaved rounds."""

import pytest
import torch

from fastgen.benchmarks import core
from fastgen.benchmarks import merging as M

DEVICE = core.default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = M.merging_cases(DEVICE) if DEVICE.type == "cuda" else M.small_cases()
PARAMS = [(c, s) for c in CASES for s in M.settings(c, c.model.cls == "UNet2DConditionModel")]
MATCH = [(n, label) for n in M.match_sizes(DEVICE) for label in ("match", "match+merge+unmerge")]

_BUILT: dict = {}  # the current case's model, step, reference output and tomesd level (one model at a time)
_DEVIATION: dict = {}  # (case, ratio) -> tomesd's relative L2, which fastgen's must equal


def _built(case):
    if case.name not in _BUILT:
        _BUILT.clear()
        core.free_memory(DEVICE)
        model = case.model.build(DEVICE, DTYPE)
        step = M.merging_step(model, case.model.inputs(DEVICE, DTYPE), case.model.forwards_per_step)
        unet = type(model).__name__ == "UNet2DConditionModel"
        level = M.first_attention_level(model) if unet else None
        _BUILT[case.name] = model, step, core.run_once(step, DEVICE)[0], level
    return _BUILT[case.name]


@pytest.mark.parametrize("case,setting", PARAMS, ids=[f"{c.model.name}-{s.label}".replace(" ", "_") for c, s in PARAMS])
def test_merging_step(benchmark, case, setting):
    model, step, ref, level = _built(case)
    if setting.tool == "fastgen" and setting.merges and not M.fastgen_merges(model, setting):
        pytest.skip(f"not supported yet: fastgen.patch merges nothing in {case.model.cls} with {setting.label}")
    with M.applied(model, setting, level):
        out, peak = core.run_once(step, DEVICE)  # also the warm-up: compilation, autotuning
        assert torch.isfinite(out).all()
        rel, mx = M.deviation(out, ref)
        if not setting.merges:  # unpatched and fastgen's exact patch: equal to rounding
            assert rel <= (1e-5 if DTYPE == torch.float32 else 2e-2), f"{case.name} {setting.label}: {rel:.3e}"
        elif setting.ratio is not None and DTYPE == torch.float32:
            # tomesd and fastgen merge the same tokens (in bf16 tomesd's own rounding of the
            # similarities can turn near-ties the other way: fastgen scores in fp32)
            twin = _DEVIATION.setdefault((case.name, setting.ratio), rel)
            assert abs(rel - twin) <= 1e-3 * twin, (rel, twin)
        benchmark.group = f"merging {case.name}"
        benchmark.extra_info.update(suite="merging", case=case.name, provider=setting.label, max_diff=mx, rel_l2=rel,
                                    peak_mb=peak, reference="unpatched, same inputs")
        benchmark(core.synced(step, DEVICE))


@pytest.mark.parametrize("n,op", MATCH, ids=[f"N{n}-{op}" for n, op in MATCH])
@pytest.mark.parametrize("impl", ["tomesd", "fastgen"])
def test_matching(benchmark, n, op, impl):
    x, side = M.matching_tokens(n, DEVICE, DTYPE)
    runs = M.matching_runs(x, side, n // 2)
    label = next(k for k in runs if k.startswith(impl) and k.split(" ")[1] == op)
    out, peak = core.run_once(runs[label], DEVICE)
    max_diff = None
    if op != "match":
        ref = runs[next(k for k in runs if k.startswith("tomesd") and k.split(" ")[1] == op)]()
        max_diff = core.max_diff(out, ref)
        if DTYPE == torch.float32:  # the same merges (bf16: see test_merging_step)
            assert max_diff <= 1e-6
    benchmark.group = f"matching N={n} {op}"
    benchmark.extra_info.update(suite="merging", case=f"matching N={n} C={M.MATCH_CHANNELS} B={M.MATCH_BATCH} {op}",
                                provider=label, max_diff=max_diff, peak_mb=peak, reference="tomesd, same tokens")
    benchmark(core.synced(runs[label], DEVICE))
