"""The benchmark suites' own entry points (``python -m fastgen.benchmarks.<suite>``): they start without
runpy's "found in sys.modules" RuntimeWarning (``fastgen.benchmarks`` loads its suites on first use of
``SUITES``), and the FractalGen suite's bad arguments are one argparse error line and exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgen.benchmarks
from fastgen.benchmarks import fractal as F

# every suite module with a ``__main__`` block, found from the files so a new one is covered too
RUNNABLE = sorted(p.stem for p in Path(fastgen.benchmarks.__file__).parent.glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text())


def test_runnable_suites_are_found():
    assert {"fractal", "framepack", "merging"} <= set(RUNNABLE)


@pytest.mark.parametrize("suite", RUNNABLE)
def test_python_m_suite_starts_without_a_runtime_warning(suite):
    # before: the package imported every suite, so runpy found the module already imported and warned
    # (under -W error it stopped with a traceback instead of running)
    r = subprocess.run([sys.executable, "-W", "error", "-m", f"fastgen.benchmarks.{suite}", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, r.stderr
    assert f"python -m fastgen.benchmarks.{suite}" in r.stdout


def test_the_package_imports_no_suite_until_suites_is_used():
    code = ("import sys, fastgen.benchmarks as B; assert not any(m.startswith('fastgen.benchmarks.') and "
            "m != 'fastgen.benchmarks.core' for m in sys.modules), sorted(sys.modules); "
            "from fastgen.benchmarks import SUITES; from fastgen.benchmarks import fractal; "
            "assert SUITES['fractal'] is fractal.run and B.SUITES is SUITES; print(','.join(SUITES))")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == ("attention,prologue,quantize,denoiser,condition,edit,merging,export,tensorrt,"
                                    "framepack,fractal")


@pytest.mark.parametrize("argv,message", [
    (["--presets", "bogus"], r"argument --presets: unknown preset\(s\) 'bogus'; the presets are fractalar_in64, "
                             r"fractalmar_in64, "),
    (["--presets", "fractalmar_in64,nope"], r"unknown preset\(s\) 'nope'"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got '0'"),
    (["--batches", "0"], "argument --batches: must be at least 1, got '0'"),
    (["--batches", "1,,2"], "argument --batches: comma-separated integers expected, got '1,,2'"),
    (["--top-iterations", "-1"], "argument --top-iterations: must be at least 0"),
    (["--threads", "0"], "argument --threads: must be at least 1"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "meta"], "--device meta: the meta device holds no data"),
    (["--device", "cpu:1"], "--device cpu:1: there is one CPU device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda:0"], "--device cuda:0 asked for, but this torch")]),
    ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_fractal_main_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        F.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m fastgen.benchmarks.fractal: error: ") and re.search(message, err[-1]), err
