"""The token-merging benchmark suite and the quality script, at tiny sizes on a CPU: the suite's rows
carry finite deviations, tomesd and fastgen (no random dst) merge the same tokens so their deviations
agree, and ``tools/tome_quality.py`` writes its table on the tiny built-in pipeline. The suite's GPU
cases are built and run on the meta device (no memory, no GPU) so that a config error shows here."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from fastgen import models
from fastgen.benchmarks import SUITES
from fastgen.benchmarks import merging as M

ROOT = Path(__file__).resolve().parents[1]

# A UNet with attention at levels 1 and 2 (SD 1.5's layout in two levels), 16 x 16 latent: 256 tokens.
TINY_UNET = models.DenoiserSpec(
    "tiny unet", "UNet2DConditionModel",
    dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=8, cross_attention_dim=32,
         attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    models.unet_inputs(2, 16, 4, 7, 32, False))
TINY_FLUX = next(s for s in models.small_denoisers() if s.cls == "FluxTransformer2DModel")


@pytest.fixture(scope="module")
def rows():
    cases = [M.MergingCase(TINY_UNET, ratios=(0.3, 0.5)), M.MergingCase(TINY_FLUX, ratios=(0.5,))]
    return M.run(torch.device("cpu"), budget_s=0.005, cases=cases, sizes=(256,), rounds=2)


def test_suite_is_registered():
    assert SUITES["merging"] is M.run


def test_rows_have_finite_deviations_and_speedups(rows):
    steps = [r for r in rows if r.extra["kind"] == "step"]
    unet = [r for r in steps if r.case.startswith("tiny unet")]
    assert [r.provider for r in unet] == ["unpatched", "fastgen (no merging)", "tomesd ToMe 0.3", "fastgen ToMe 0.3",
                                          "tomesd ToMe 0.5", "fastgen ToMe 0.5", "fastgen ToDo x2"]
    for r in steps:
        if r.extra.get("status"):  # a DiT fastgen does not merge yet
            assert r.extra["status"] == "not supported yet" and math.isnan(r.ms)
            continue
        assert math.isfinite(r.ms) and r.ms > 0 and len(r.extra["round_ms"]) == 2
        assert math.isfinite(r.extra["rel_l2"]) and math.isfinite(r.max_diff) and math.isfinite(r.speedup)
        if r.provider in ("unpatched", "fastgen (no merging)"):
            assert r.extra["rel_l2"] <= 1e-5  # exact
        else:
            assert 0 < r.extra["rel_l2"] < 1  # merging changes the output, not beyond recognition
            assert r.extra["merging"] or r.provider.startswith("tomesd")
    assert "level 1" in next(r for r in unet if r.provider == "fastgen ToMe 0.5").extra["merging"]
    assert next(r for r in unet if r.provider == "tomesd ToMe 0.5").extra["tomesd_max_downsample"] == 1


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_tomesd_and_fastgen_merge_the_same_tokens(rows, ratio):
    by = {r.provider: r for r in rows if r.case.startswith("tiny unet")}
    t, f = by[f"tomesd ToMe {ratio:g}"], by[f"fastgen ToMe {ratio:g}"]
    assert f.extra["rel_l2"] == pytest.approx(t.extra["rel_l2"], rel=1e-4, abs=1e-7)
    assert f.max_diff == pytest.approx(t.max_diff, rel=1e-3, abs=1e-6)
    assert "vs_tomesd" in f.extra and math.isfinite(f.extra["vs_tomesd"])


def test_matching_rows_equal_tomesd(rows):
    matching = {r.provider: r for r in rows if r.extra["kind"] == "matching"}
    assert set(matching) == {"tomesd match", "fastgen match (torch)", "tomesd match+merge+unmerge",
                             "fastgen match+merge+unmerge (torch)"}
    assert matching["fastgen match+merge+unmerge (torch)"].max_diff <= 1e-6  # same merges, fp32 rounding
    lines = M.merging_table(rows)
    assert any("| fastgen ToMe 0.5 |" in line for line in lines) and any("| fastgen match (torch) |" in line
                                                                          for line in lines)


def test_settings_and_unsupported_rows():
    case = M.MergingCase(TINY_FLUX, ratios=(0.5,), todo=None)
    assert [s.label for s in M.settings(case, unet=False)] == ["unpatched", "fastgen (no merging)", "fastgen ToMe 0.5"]
    assert M.Setting("x", "fastgen", ratio=0.5).patch_kwargs()["tome"].use_rand is False  # tomesd's merges
    with pytest.raises(ValueError, match="square"):
        M.matching_tokens(4000, torch.device("cpu"), torch.float32)


def test_gpu_cases_build_and_run_on_meta():
    # The real SD 1.5 config at every GPU size (SDXL, Flux-dev and Wan: tests/test_models.py); Flux at 2048^2 too.
    cases = M.merging_cases("cuda")
    assert [c.model.name for c in cases][:3] == ["sd15 512px cfg", "sd15 1024px cfg", "sd15 2048px cfg"]
    model = cases[0].model.build("meta", torch.bfloat16)
    assert M.first_attention_level(model) == 1
    for case in cases[:3]:
        out = M.merging_step(model, case.model.inputs("meta", torch.bfloat16), 1)()
        side = case.model.inputs("meta", torch.bfloat16)["sample"].shape[-1]
        assert out.shape == (2, 4, side, side)
    flux = next(c for c in cases if c.model.name == "flux-dev 2048^2").model
    assert flux.inputs("meta", torch.bfloat16)["hidden_states"].shape == (1, 16384, 64)
    assert M.match_sizes("cuda") == (4096, 16384, 65536) and M.match_sizes("cpu") == (4096, 16384)


def test_quality_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("tome_quality", ROOT / "tools" / "tome_quality.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules["tome_quality"] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two images\na red fox\n\na bowl of ramen\n")
    out = tmp_path / "out"
    assert tool.main(["--model", "tiny-sd15", "--steps", "2", "--ratios", "0.5", "--todo", "2", "--prompts",
                      str(prompts), "--out", str(out), "--device", "cpu"]) == 0
    table = (out / "report.md").read_text()
    assert "| unpatched |" in table and "| fastgen ToMe 0.5 |" in table and "| fastgen ToDo x2 |" in table
    assert "2 image(s) per setting" in table
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 6
    assert tool.psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)) == math.inf
    assert tool.psnr(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.1)) == pytest.approx(20.0)
