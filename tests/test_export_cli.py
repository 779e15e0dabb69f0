"""``fastgen export onnx`` and ``fastgen export plan``, run in-process through ``fastgen.cli.main``: the
export summary (inputs with their symbolic dimensions, ranges, onnxruntime's difference per validated
shape, the target check) and its progress bar; a model folder loaded with ``from_pretrained``; a target
that refuses a node (named, exit status 1); the plan table; bad values as one-line errors with exit
status 2 and no traceback."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastgen.cli import main  # noqa: E402
from fastgen.export import operators  # noqa: E402
from fastgen.export.plan import FAMILIES  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporter():
    # torch.onnx logs a warning per torchvision op it cannot register: noise in a test run
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_export_onnx_summary_and_progress(tmp_path, capsys):
    out = tmp_path / "flux.onnx"
    assert main(["export", "onnx", "flux:tiny", str(out), "--height", "32:64", "--width", "32:48", "--batch", "1:3",
                 "--target", "tensorrt-10.1"]) == 0
    printed = capsys.readouterr()
    assert out.is_file()
    text = printed.out
    assert f"wrote {out} (" in text and "FluxTransformer2DModel flux:tiny (random weights)" in text
    assert "opset 20, float32" in text
    assert re.search(r"hidden_states\s+\[batch, image_tokens, 4\]", text)
    assert re.search(r"encoder_hidden_states\s+\[batch, text_tokens, 32\]", text)
    assert re.search(r"noise_pred\s+\[batch, image_tokens, 4\]", text)
    assert "ranges: batch 1-3, height 32-64 px, width 32-48 px" in text
    diffs = [float(d) for d in re.findall(r"max abs diff (\S+) ", text)]
    assert len(diffs) == 3 and max(diffs) < 1e-4  # fp32 onnxruntime vs PyTorch: summation order only
    assert "operator check for tensorrt-10.1: every node supported" in text
    assert "to_onnx flux" in printed.err and "100%" in printed.err  # the progress bar, on stderr


def test_model_folder_and_a_target_that_refuses_a_node(tmp_path, capsys, monkeypatch):
    FAMILIES["flux:tiny"].build().save_pretrained(tmp_path / "model")
    real = operators.target

    def without_matmul(name):  # a TensorRT release that could not parse MatMul
        t = real(name)
        return dataclasses.replace(t, operators=t.operators - {"MatMul"}) if name == "tensorrt-10.1" else t

    monkeypatch.setattr(operators, "target", without_matmul)
    out = tmp_path / "flux.onnx"
    assert main(["export", "onnx", str(tmp_path / "model"), str(out), "--target", "tensorrt-10.1", "--no-validate",
                 "--quiet"]) == 1
    printed = capsys.readouterr()
    assert f"{out}: " in printed.out and "node(s) would fail on tensorrt-10.1" in printed.out
    failing = [line for line in printed.out.splitlines() if line.startswith("  ")]
    assert failing and all("(MatMul): tensorrt-10.1 has no MatMul" in line for line in failing)
    assert out.is_file()  # kept for inspection
    assert printed.err == ""  # --quiet: no bar, no notice


@pytest.mark.parametrize("args, message", [
    (["--height", "0:4"], "argument --height: must be a positive N or MIN:MAX"),
    (["--height", "64:32"], "argument --height: must be a positive N or MIN:MAX"),
    (["--width", "big"], "argument --width: not N or MIN:MAX"),
    (["--target", "tensorrt-9"], "argument --target: unknown export target 'tensorrt-9'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--opset", "0"], "argument --opset: must be at least 1"),
])
def test_export_onnx_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "onnx", "flux:tiny", str(tmp_path / "m.onnx"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"fastgen export onnx: error: {message}")
    assert "Traceback" not in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["flux:huge"], "unknown family 'flux:huge'"),
    (["flux:tiny", "--height", "40"], "height must be multiples of 16 pixels"),
    (["flux:tiny", "--dtype", "bfloat16"], "add --no-validate"),
    (["flux:tiny", "--frames", "9"], "frames applies to video models"),
])
def test_export_onnx_bad_values_after_parsing(tmp_path, capsys, argv, message):
    assert main(["export", "onnx", argv[0], str(tmp_path / "m.onnx"), *argv[1:], "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fastgen export onnx: error: ") and message in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_plan_table(capsys):
    assert main(["export", "plan", "flux:tiny", "--vram", "8GiB", "--precision", "fp8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Plan: flux:tiny (FluxTransformer2DModel), fp8, card 8.00 GiB")
    assert "| batch 2, 64x64, 7 text | 16 |" in text and "fits, no streaming" in text
    assert main(["export", "plan", "flux-dev", "--vram", "8", "--height", "512:1024", "--width", "512:1024"]) == 0
    text = capsys.readouterr().out
    assert "11.901 B parameters, 22.17 GiB at bf16" in text
    assert "| batch 1, 512x512, 512 text | 1024 |" in text and "| batch 1, 1024x1024, 512 text | 4096 |" in text
    assert "streams" in text and re.search(r"weight_streaming_budget_v2 = \d+", text)
    # 1 GiB of workspace and 1 GiB of reserve leave nothing on a 2 GiB card: exit status 1
    assert main(["export", "plan", "flux-dev", "--vram", "2GiB"]) == 1
    assert "does not fit: the activations, workspace and reserve alone exceed the card" in capsys.readouterr().out
    assert main(["export", "plan", "flux-dev", "--vram", "2GiB", "--workspace", "0", "--reserve", "0B"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["flux:tiny"], "the following arguments are required: --vram"),
    (["flux:tiny", "--vram", "0"], "argument --vram: a size must be positive"),
    (["flux:tiny", "--vram", "lots"], "argument --vram: not a size"),
    (["flux:tiny", "--vram", "8", "--precision", "int4"], "argument --precision: must be one of fp32, bf16, fp16, fp8"),
    (["flux:tiny", "--vram", "8", "--batch", "0"], "argument --batch: must be a positive N"),
])
def test_export_plan_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "plan", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"fastgen export plan: error: {message}") and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["flux-schnell"], "unknown family 'flux-schnell'"),
    (["flux:tiny", "--frames", "5"], "frames applies to video models"),
    (["wan:tiny", "--frames", "6"], "frames must be 4k + 1"),
    (["flux:tiny", "--height", "40"], "multiple of 16 pixels"),
])
def test_export_plan_bad_values_after_parsing(capsys, argv, message):
    assert main(["export", "plan", *argv, "--vram", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fastgen export plan: error: ") and message in err


def test_export_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export"])
    assert exit_.value.code == 2 and "fastgen export: error:" in capsys.readouterr().err


def test_weights_larger_than_memory_are_refused_before_building(tmp_path, capsys, monkeypatch):
    # flux-dev in bfloat16 is 22.17 GiB of weights (counted on meta): with 1 GiB available, a one-line
    # error (exit status 2) instead of building it and being killed for memory
    import fastgen.cli as cli

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2097152 kB\nMemAvailable:    1048576 kB\n")
    monkeypatch.setattr(cli, "_MEMINFO", meminfo)
    plan = importlib.import_module("fastgen.export.plan")  # the module (fastgen.export.plan is its function)

    built, real_build = [], plan.build
    monkeypatch.setattr(plan, "build", lambda cls, config, device="cpu", *a, **k: built.append(str(device)) or
                        real_build(cls, config, device, *a, **k))
    out = tmp_path / "x.onnx"
    assert main(["export", "onnx", "flux-dev", str(out), "--no-validate", "--height", "64", "--width", "64",
                 "--batch", "1", "--dtype", "bfloat16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fastgen export onnx: error: flux-dev's weights need 22.17 GiB")
    assert "1.00 GiB of host memory is available" in err and "--meta" in err
    assert built == ["meta"] and not out.exists()  # counted on meta, never built for real
    meminfo.unlink()  # no /proc/meminfo (not Linux): no check
    assert cli._available_memory() is None


def test_meta_exports_the_graph_without_weights(tmp_path, capsys):
    out = tmp_path / "flux.onnx"
    assert main(["export", "onnx", "flux:tiny", str(out), "--meta", "--height", "64", "--width", "64", "--batch", "1",
                 "--dtype", "bfloat16", "--target", "tensorrt-10.14", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "FluxTransformer2DModel flux:tiny (meta: no weights)" in text and "bfloat16" in text
    assert re.search(r"hidden_states\s+\[1, 16, 4\]", text) and "transformer_blocks" not in text
    assert re.search(r"and \d+ weights as graph inputs \(--meta", text)
    assert "not validated (--meta: no weights)" in text and "operator check for tensorrt-10.14: every node supported" in text


def test_an_export_failure_is_one_line_with_exit_status_1(tmp_path, capsys, monkeypatch):
    import fastgen.export

    def failing(*args, **kwargs):
        raise RuntimeError("onnxruntime: [ONNXRuntimeError] : 1 : FAIL : Load model failed\nmore detail")

    monkeypatch.setattr(fastgen.export, "to_onnx", failing)
    assert main(["export", "onnx", "flux:tiny", str(tmp_path / "m.onnx"), "--quiet"]) == 1
    printed = capsys.readouterr()
    assert printed.err == ("fastgen export onnx: export failed: RuntimeError: onnxruntime: [ONNXRuntimeError] : 1 : "
                           "FAIL : Load model failed\n") and printed.out == ""
