"""The ONNX export benchmark suite at its tiny cases on the CPU: rows for both runtimes with finite
times in interleaved rounds, onnxruntime's output equal to PyTorch's to fp32 summation order, the
suite registered with its own table, a row saying what to install where onnxruntime is missing, and
the feed a UNet's graph takes."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastgen.benchmarks import SUITES, environment, markdown_table  # noqa: E402
from fastgen.benchmarks import export as E  # noqa: E402

REL_TOL = 1e-4  # fp32, the same graph: ~1e-6 of the output's scale (tests/test_export_onnx.py)


@pytest.fixture(scope="module")
def rows(shared_export_case):
    # The suite's own run; its exports are the session's (conftest.py): bench/bench_export.py exports the
    # same tiny cases, and each export costs ~10 s of CI's time.
    logging.disable(logging.WARNING)  # torch.onnx logs a warning per torchvision op it cannot register
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(E, "export_case", shared_export_case)
            return E.run("cpu", budget_s=0.01, cases=E.export_cases(("tiny",)), rounds=2)
    finally:
        logging.disable(logging.NOTSET)


def test_rows_compare_both_runtimes(rows):
    assert [(r.case, r.provider) for r in rows] == [("flux tiny", E.EAGER), ("flux tiny", E.ORT),
                                                    ("unet tiny", E.EAGER), ("unet tiny", E.ORT)]
    for r in rows:
        e = r.extra
        assert math.isfinite(r.ms) and r.ms > 0 and len(e["round_ms"]) == 2
        assert r.ms == pytest.approx(sorted(e["round_ms"])[0] / 2 + sorted(e["round_ms"])[1] / 2)  # median of 2
        assert e["threads"] == torch.get_num_threads() and e["export_s"] > 0 and e["file_mb"] > 0
        if r.provider == E.EAGER:
            assert r.max_diff == 0 and r.speedup == 1
        else:
            assert r.max_diff < REL_TOL * 10 and e["rel_diff"] < REL_TOL, (r.case, r.max_diff, e["rel_diff"])
            eager = next(b for b in rows if b.case == r.case and b.provider == E.EAGER)
            assert r.speedup == pytest.approx(eager.ms / r.ms)


def test_registered_with_its_own_table(rows):
    assert SUITES["export"] is E.run
    table = markdown_table(rows, environment("cpu"))
    assert "ONNX export: ms per forward on the CPU" in table
    assert "| flux tiny | onnxruntime cpu |" in table and "| unet tiny | pytorch eager |" in table
    assert "| suite | case | provider |" not in table  # none of its rows in the shared table


def test_table_without_rounds():
    # rows as bench/conftest.py makes them: medians only; the ratio comes from the two medians
    rows = [E.Result("export", "c", E.EAGER, 4.0), E.Result("export", "c", E.ORT, 1.0, max_diff=1e-7)]
    line = next(x for x in E.export_table(rows) if x.startswith(f"| c | {E.ORT}"))
    assert "| 1.000 |  | 4.00x | 1.00e-07 |" in line


def test_missing_onnxruntime_is_a_row(monkeypatch):
    monkeypatch.setattr(E, "missing_dependency", lambda: "onnxruntime is not installed (test)")
    rows = E.run("cpu", cases=E.export_cases(("tiny",)))
    assert [r.case for r in rows] == ["flux tiny", "unet tiny"] and all(math.isnan(r.ms) for r in rows)
    assert all("pip install 'fastgen[onnx]'" in line for line in E.export_table(rows)[5:])


def test_cases_and_feed():
    assert [c.name for c in E.export_cases()] == ["flux tiny", "unet tiny", "flux small 256^2", "sd15 small 256^2 cfg"]
    with pytest.raises(ValueError, match="sizes must be among"):
        E.export_cases(("huge",))
    x = torch.zeros(2, 3)
    feed = E.ort_feed(dict(sample=x, timestep=x, added_cond_kwargs=dict(text_embeds=x, time_ids=x)),
                      ["sample", "timestep", "text_embeds", "time_ids"])
    assert list(feed) == ["sample", "timestep", "text_embeds", "time_ids"] and feed["time_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="lack \\['img_ids'\\]"):
        E.ort_feed(dict(hidden_states=x), ["hidden_states", "img_ids"])
