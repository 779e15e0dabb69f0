"""`import fastgen` from an editable install and from a built wheel; without triton; the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastgen

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=600)


def test_editable_install_maps_kernels_to_top_level_folder():
    import fastgen.kernels.attention as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    assert Path(fastgen.__file__).resolve().parent == ROOT / "src" / "fastgen"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, FASTGEN_SKIP_CUDA_BUILD="1"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("fastgen-*.whl")
    return whl


def test_wheel_contains_library_and_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("fastgen/__init__.py", "fastgen/ops/attention.py", "fastgen/kernels/attention.py",
                   "fastgen/kernels/qk_norm_rope.py", "fastgen/cli.py"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch>=" in text and "==" not in text.split("Requires-Dist: torch")[1].split("\n")[0], \
        "the wheel must accept the user's own torch (no pin)"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastgen = fastgen.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_built_wheel_imports_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    code = (
        "import fastgen, torch, fastgen.kernels.attention as k; "
        "assert fastgen.__file__.startswith(%r), fastgen.__file__; "
        "q = torch.randn(1, 2, 9, 64); print(fastgen.ops.attention(q, q, q).shape)" % str(target)
    )
    # run from a folder without the source tree, so only the installed copy can be found
    res = run_py(code, {"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 2, 9, 64])" in res.stdout


def test_import_without_triton_falls_back():
    code = (
        "import sys, warnings, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'): raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastgen\n"
        "from fastgen.kernels._common import HAVE_TRITON\n"
        "assert not HAVE_TRITON\n"
        "q = torch.randn(1, 2, 9, 64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = fastgen.ops.attention(q, q, q, backend='triton')\n"
        "    fastgen.ops.qk_norm_rope(q, q, backend='triton', rope=None, norm='head')\n"
        "assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))\n"
        "print([str(x.message) for x in w])\n"
    )
    res = run_py(code)
    assert res.returncode == 0, res.stderr
    assert "triton is not importable" in res.stdout


def test_cli_info_lists_backends_and_reasons():
    res = subprocess.run([sys.executable, "-m", "fastgen.cli", "info", "--device", "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for needle in ("fastgen " + fastgen.__version__, "torch", "attention backends on cpu", "sdpa", "triton", "xformers",
                   "compiled kernels (fastgen._C)"):
        assert needle in res.stdout, f"{needle!r} not in:\n{res.stdout}"


def test_cli_bench_prints_table_and_writes_results(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastgen.cli", "bench", "--suite", "prologue", "--device", "cpu",
                          "--budget", "0.01", "--quiet", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "| prologue |" in res.stdout and "torch-unfused" in res.stdout and "fastgen-triton" in res.stdout
    import json

    data = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert data["environment"]["device"].startswith("CPU") and data["environment"]["torch"]
    assert {r["provider"] for r in data["results"]} == {"torch-unfused", "fastgen-triton"}
    assert all(r["max_diff"] < 1e-4 for r in data["results"])
