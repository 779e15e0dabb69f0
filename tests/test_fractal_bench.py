"""The FractalGen benchmark suite (fastgen.benchmarks.fractal) on a CPU: the block sampler is faster than the
reference at every batch size tested on a small config, with the same images; the GPU cases' configs (on
the meta device) and the subset of top-level iterations they time."""

from __future__ import annotations

import re
import statistics

import pytest
import torch

from fastgen.benchmarks import SUITES, environment, markdown_table
from fastgen.benchmarks import fractal as F
from fastgen.fractal import PUBLISHED_PARAMETERS, FractalGen, make_plan
from fastgen.fractal.config import small_config
from fractal_models import single_thread  # noqa: F401 (an autouse fixture: one thread)


def test_block_is_faster_than_the_reference_at_every_batch_size():
    cases = F.fractal_cases("cpu", batches=(1, 4, 16), top_iterations=2)
    rows = F.run(torch.device("cpu"), cases=cases, rounds=3)
    assert SUITES["fractal"] is F.run and len(rows) == 6
    for reference, block in zip(rows[::2], rows[1::2]):
        assert (reference.provider, block.provider) == (F.REFERENCE, F.BLOCK) and reference.case == block.case
        assert block.extra["equal_fraction"] == 1.0  # the same images, bit for bit
        assert block.extra["estimated"] and block.extra["top_iterations"] == 2 and block.extra["iterations"] == 16
        # scaled to a whole image: the reference by tokens, the block by the larger of tokens and iterations
        ratio = block.extra["tokens"] / block.extra["top_tokens"]
        assert reference.extra["scale"] == ratio and block.extra["scale"] == max(ratio, 8.0)
        assert reference.ms == pytest.approx(statistics.median(reference.extra["round_ms"]) * ratio)
        # 3 interleaved rounds on a shared machine: the fastest round of each (the least disturbed) decides
        fastest = min(block.extra["round_ms"]), min(reference.extra["round_ms"])
        assert fastest[0] < fastest[1], (block.case, reference.extra["round_ms"], block.extra["round_ms"])
        assert block.speedup == pytest.approx(reference.ms / block.ms)
    table = markdown_table(rows, environment("cpu"))
    assert "FractalGen: images per second" in table and "| suite | case |" not in table
    assert "| 16 | block |" in table and re.search(r"2 of 16 \(\d+ of 64 tokens; estimated, x[\d.]+\)", table)


def test_gpu_cases_and_the_timed_subset():
    cases = F.fractal_cases("cuda")
    assert [(c.name, c.batch) for c in cases[:3]] == [("fractalmar_in64", b) for b in (1, 16, 256)]
    assert {c.name for c in cases} == set(F.GPU_PRESETS) and all(c.dtype == "bfloat16" for c in cases)
    for preset in F.GPU_PRESETS:
        with torch.device("meta"):
            model = FractalGen(preset)
        assert abs(sum(p.numel() for p in model.parameters()) / PUBLISHED_PARAMETERS[preset] - 1) < 0.01
    model = FractalGen(small_config("fractalmar_in64"))  # 256 tokens in 64 iterations at the top
    plan = make_plan(model, [1], progress=False)
    sub = F.subset_plan(plan, 8)
    assert sub.levels[0].num_iter == 8 and sub.levels[1:] == plan.levels[1:]
    assert sub.levels[0].bounds == plan.levels[0].bounds[4::8]  # each span's middle iteration
    # its share of the tokens is its share of the iterations (the cosine schedule's counts rise): 32 of 256
    assert sum(sub.levels[0].counts) == 32 and min(sub.levels[0].counts) == 1 and max(sub.levels[0].counts) >= 6
    assert sum(F.subset_plan(plan, 2).levels[0].counts) == 7  # the ImageNet 256 cases' subset: 2 of 64 (8 pro rata)
    assert F.subset_plan(plan, None) is plan and F.subset_plan(plan, 64) is plan
    with pytest.raises(ValueError, match="batch"):
        F.FractalCase("x", F.cpu_config(), 0)


@pytest.mark.parametrize("kinds", [("mar", "mar"), ("ar", "mar")])
def test_generated_pixels_are_what_a_subset_changes(kinds):
    from fractal_models import model_of, tiny

    from fastgen.fractal.model import values_to_uint8
    from fastgen.fractal.sampler import ReferenceSampler

    model = model_of(tiny(kinds, num_conds=1 if kinds[0] == "ar" else 5))
    plan = make_plan(model, [1, 2, 3], cfg=2.0, seed=5, progress=False)
    assert F.generated_pixels(model, plan).all()
    sub = F.subset_plan(plan, 2)
    mask = F.generated_pixels(model, sub)
    with torch.inference_mode():
        images = values_to_uint8(ReferenceSampler(model, sub)())
    untouched = values_to_uint8(torch.zeros_like(images, dtype=torch.float32))  # tokens never generated: zeros
    assert 0 < mask.float().mean() < 1 and mask.shape == images.shape
    assert torch.equal(images[~mask], untouched[~mask])
    assert (images[mask] != untouched[mask]).any()  # generated values (almost all differ from the untouched)


def test_a_case_budget_cuts_the_rounds_to_what_fits_but_keeps_one():
    case = F.fractal_cases("cpu", batches=(1,), top_iterations=1)[0]
    model = F.build_model(case, torch.device("cpu"))
    cut = F.run_case(model, case, torch.device("cpu"), rounds=5, budget_s=1e-6)
    assert [len(r.extra["round_ms"]) for r in cut] == [1, 1]
    full = F.run_case(model, case, torch.device("cpu"), rounds=2, budget_s=None)
    assert [len(r.extra["round_ms"]) for r in full] == [2, 2]
