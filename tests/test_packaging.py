"""`import fastgen` from an editable install and from a built wheel; without triton; the CLI; no import
cycles among fastgen's modules."""

from __future__ import annotations

import ast
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
                   "fastgen/kernels/qk_norm_rope.py", "fastgen/cli.py", "fastgen/models.py",
                   "fastgen/benchmarks/__init__.py", "fastgen/benchmarks/core.py", "fastgen/benchmarks/edit.py",
                   "fastgen/kernels/merging.py", "fastgen/merging/dit.py", "fastgen/export/operators.py",
                   "fastgen/export/tensorrt_operators.json", "fastgen/fractal/weights/digits.pt",
                   "fastgen/fractal/weights/digits_classifier.pt"):
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


# --------------------------------------------------------------------------------------------
# Import graph
# --------------------------------------------------------------------------------------------


def _module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} of every module under ``roots`` ({package name: its folder})."""
    out = {}
    for package, folder in roots.items():
        for f in folder.rglob("*.py"):
            parts = [package, *f.relative_to(folder).with_suffix("").parts]
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.setdefault(name, f)  # "fastgen.kernels" maps to kernels/, not to a src/fastgen/kernels folder
    return out


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules of ``roots`` it imports}, at any depth in the file (function-level imports
    too: they close a cycle when the function runs). Importing ``a.b.c`` also runs the packages
    ``a`` and ``a.b``; a module's own parent packages are left out, as Python has them (partly)
    initialised before the module runs."""
    files = _module_files(roots)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = known(name)
                while target:
                    if target != module and not module.startswith(target + "."):
                        edges.add(target)
                    target = target.rpartition(".")[0]
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_import_graph_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import a\n")  # a package importing its own parts: fine
    (pkg / "sub" / "a.py").write_text("import pkg.sub\nfrom pkg.sub.b import x\n")
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    (pkg / "c.py").write_text("def f():\n    from .d import y\n")
    (pkg / "d.py").write_text("from pkg import c\ny = 2\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.sub.a"] == {"pkg.sub.b"} and graph["pkg.c"] == {"pkg.d"}
    assert import_cycles(graph) == [["pkg.c", "pkg.d"]]


def test_fastgen_has_no_import_cycles():
    graph = import_graph({"fastgen": ROOT / "src" / "fastgen", "fastgen.kernels": ROOT / "kernels"})
    assert {"fastgen.demo", "fastgen.models", "fastgen.benchmarks", "fastgen.benchmarks.edit"} <= set(graph)
    assert "fastgen.models" in graph["fastgen.benchmarks.edit"] and "fastgen.benchmarks.core" in graph["fastgen.demo"]
    assert import_cycles(graph) == []


@pytest.mark.parametrize("module", ["fastgen.models", "fastgen.demo", "fastgen.benchmarks.edit", "fastgen.benchmarks"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    res = run_py(f"import {module}")
    assert res.returncode == 0, res.stderr
