"""bench/run_gpu.sh quick, end to end on this CPU (--dry-run: tiny shapes, the Triton interpreter, no
build), so a short GPU window is never lost to an error in the script, its stages or its summary."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back


def _script_env() -> dict:
    # The script's own pytest runs must not believe they are pytest-xdist workers (which this test may
    # run in): pytest-benchmark reads PYTEST_XDIST_WORKER and then records nothing.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}


@pytest.mark.slow
def test_quick_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(_script_env(), PYTHON=sys.executable)
    env.pop("FASTGEN_CACHE_DIR", None)  # the script sets its own
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), str(out), "quick", "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # a lent machine returns at most 8 files
    assert all(NAME.match(p.name) and len(p.relative_to(out).parts) <= 3 for p in files), files
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "commit" in summary
    for stage in ("tests", "bench", "flux"):
        assert re.search(rf"^\| {stage} \| ok \| \d+ \|$", summary, re.M), summary
    assert re.search(r"^\d+ passed", summary.split("## Tests")[1].strip(), re.M), summary  # the tests' result line
    assert "| attention |" in summary and "| prologue |" in summary  # fastgen's benchmark tables
    assert "## Flux-dev step" in summary and "Speed-up" in summary and "of a 28-step generation" in summary
    assert {"summary.md", "tests.log", "bench.log", "flux-step.json"} <= {p.name for p in files}


def _run(out, *args, **env):
    return subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), str(out), *args],
                          cwd=ROOT, env=dict(_script_env(), PYTHON=sys.executable, **env), capture_output=True,
                          text=True, timeout=300)


def _phase_dry_run(tmp_path, phase: str, stages: tuple[str, ...], **env) -> str:
    # One phase's --dry-run: it succeeds, brings back at most 8 files, and its stages ran; its summary.md.
    proc = _run(tmp_path / "out", phase, "--dry-run", **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    summary = (tmp_path / "out" / "summary.md").read_text()
    for stage in stages:
        assert re.search(rf"^\| {stage} \| ok \| \d+ \|$", summary, re.M), summary
    return summary


@pytest.mark.slow
def test_merging_phase_dry_run(tmp_path):
    summary = _phase_dry_run(tmp_path, "merging", ("mtests", "merging"))
    assert "Token merging: ms per denoising step" in summary and "| fastgen ToMe 0.5 |" in summary
    assert "Matching: fastgen bipartite_match vs tomesd" in summary


@pytest.mark.slow
def test_framepack_phase_dry_run(tmp_path):
    summary = _phase_dry_run(tmp_path, "framepack", ("ftests", "framepack"), FASTGEN_FRAMEPACK_SECTIONS="2")
    assert re.search(r"^\d+ passed", summary.split("## Tests")[1].strip(), re.M), summary
    assert "FramePack: one video, per section" in summary and "| fastgen low-VRAM | 1 |" in summary
    assert "Per section, framepack tiny stand-in" in summary and "\n| 2 | " in summary


def test_a_stage_cut_at_its_limit_still_leaves_a_summary_that_says_so(tmp_path):
    proc = _run(tmp_path / "out", "demo", "--dry-run", RUN_GPU_LIMIT_demo="1")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert re.search(r"^\| demo \| cut at its 1 s limit \| \d+ \|$", summary, re.M), summary
    assert "Cut at their time limit: demo" in summary and "## Demo" in summary


def test_an_unknown_phase_is_refused_before_anything_runs(tmp_path):
    proc = _run(tmp_path / "out", "quick", "bencht", "--dry-run")
    assert proc.returncode == 2 and "unknown phase 'bencht'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_summary_merges_the_decisions_of_every_stage(tmp_path):
    # A CPU decides nothing (one candidate), so the dry run cannot reach this part: fed directly.
    import torch

    from fastgen.ops import autotune as tuning

    cpu, ref = torch.device("cpu"), torch.zeros(4)
    for folder, name in (("run", "attention"), ("flux", "qk_norm_rope")):
        t = tuning.Tuner(tmp_path / folder / tuning.FILE_NAME, timer=lambda n, f, d: {"a": 1.0, "b": 2.0}[n])
        t.decide(name, tuning.make_key(cpu, name, f"bf16,{folder}"), cpu, {"a": lambda: ref, "b": lambda: ref},
                 lambda: ref, None, torch.bfloat16, "b")
    out = tmp_path / "out"
    out.mkdir()
    stages = tmp_path / "stages"
    stages.write_text("tests|ok|3\nflux|cut at its 75 s limit|75\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "summarize.py"), str(out), "--stages", str(stages),
                    "--phases", "quick", "--decisions", str(tmp_path / "run"), str(tmp_path / "flux")], check=True,
                   cwd=ROOT, timeout=120)
    summary = (out / "summary.md").read_text()
    assert "## Decisions file (2 keys)" in summary and "Cut at their time limit: flux" in summary
    assert "attention [bf16,run] -> a: fastest correct: a 1 ms (then b 2 ms)" in summary
    assert "qk_norm_rope [bf16,flux] -> a" in summary
    import json

    assert len(json.loads((out / "autotune.json").read_text())["entries"]) == 2


@pytest.mark.slow
def test_fractal_phase_dry_run(tmp_path):
    summary = _phase_dry_run(tmp_path, "fractal", ("fractests", "fractal"))
    assert re.search(r"^\d+ passed", summary.split("## Tests")[1].strip(), re.M), summary
    assert "FractalGen: images per second" in summary
    assert re.search(r"^\| cpu-small-mar .* \| 4 \| block \| [\d.]+ \| .* \| 100\.0% \|", summary, re.M), summary
