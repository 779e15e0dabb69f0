"""Measured backend choice (fastgen.ops.autotune): injected timings and injected wrong candidates on CPU.

The decision logic is device-independent; on a CPU the op-level tests widen the candidate list to
PyTorch and the Triton interpreter, so the same code a GPU runs picks, rejects and persists here.
"""

import importlib
import json
import math
import multiprocessing
import os

import pytest
import torch

import fastgen
from fastgen import FastgenFallbackWarning
from fastgen.ops import autotune as tuning

# the modules, not the functions fastgen.ops exports under the same names
attn_mod = importlib.import_module("fastgen.ops.attention")
pro_mod = importlib.import_module("fastgen.ops.prologue")

CPU = torch.device("cpu")


def _timer(times, calls=None):
    def timer(name, fn, device):
        if calls is not None:
            calls.append(name)
        fn()
        return times[name]
    return timer


def _ok(x):
    return lambda: x.clone()


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A fresh tuner whose file lives in tmp_path, installed as the one the ops use."""
    t = tuning.Tuner(tmp_path / "autotune.json")
    monkeypatch.setattr(tuning, "TUNER", t)
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "1")  # tests/conftest.py switches it off for the kernel tests
    return t


def _decide(t, candidates, key="k1", static="a", allow=True, ref=None):
    ref = torch.randn(64) if ref is None else ref
    cands = {n: (f(ref) if callable(f) else f) for n, f in candidates.items()}
    return t.decide("attention", tuning.make_key(CPU, "attention", key), CPU, cands, lambda: ref, None,
                    torch.float16, static, allow=allow)


def test_faster_correct_candidate_wins_and_wrong_one_never(tuner):
    tuner.timer = _timer({"a": 5.0, "b": 1.0, "c": 0.1})
    garbage = lambda ref: (lambda: ref + 1.0)  # noqa: E731
    with pytest.warns(FastgenFallbackWarning, match="'c' gave a wrong result"):
        d = _decide(tuner, {"a": _ok, "b": _ok, "c": garbage})
    assert d.backend == "b" and d.source == "measured"
    assert set(d.times_ms) == {"a", "b"} and "wrong result" in d.rejected["c"]
    assert "fastest correct: b" in d.why


def test_error_tolerance_is_per_dtype_and_pytorch_relative(tuner):
    ref = torch.randn(256)
    tuner.timer = _timer({"close": 0.5, "ref": 1.0})
    noisy = lambda r: (lambda: r + 0.03 * r.abs().max())  # noqa: E731  # 3% off: wrong in fp16
    with pytest.warns(FastgenFallbackWarning):
        d = _decide(tuner, {"close": noisy, "ref": _ok}, ref=ref)
    assert d.backend == "ref"
    # PyTorch's own error of 1% makes 4% acceptable.
    d = tuner.decide("attention", tuning.make_key(CPU, "attention", "k2"), CPU,
                     {"close": noisy(ref), "ref": _ok(ref)}, lambda: ref, lambda r: 0.01, torch.float16, "ref")
    assert d.backend == "close"


def test_candidate_that_cannot_run_is_left_out_quietly(tuner, recwarn):
    def broken(ref):
        def run():
            raise RuntimeError("No available kernel. Aborting execution.")
        return run
    tuner.timer = _timer({"a": 2.0})
    d = _decide(tuner, {"a": _ok, "flash": broken})
    assert d.backend == "a" and "cannot run" in d.rejected["flash"]
    assert not [w for w in recwarn if issubclass(w.category, FastgenFallbackWarning)]


def test_nothing_correct_falls_back_to_the_static_table(tuner):
    tuner.timer = _timer({})
    with pytest.warns(FastgenFallbackWarning):
        d = _decide(tuner, {"a": lambda r: (lambda: r * 2), "b": lambda r: (lambda: r * 3)}, static="sdpa")
    assert d.backend == "sdpa" and d.source == "static" and set(d.rejected) == {"a", "b"}


def test_decisions_persist_and_are_not_measured_again(tuner, tmp_path):
    calls = []
    tuner.timer = _timer({"a": 3.0, "b": 1.0}, calls)
    assert _decide(tuner, {"a": _ok, "b": _ok}).backend == "b"
    assert sorted(calls) == ["a", "b"]
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["format"] == tuning.FORMAT and len(data["entries"]) == 1

    def never(ref):
        def run():
            raise AssertionError("a decided key was measured again")
        return run
    fresh = tuning.Tuner(tmp_path / "autotune.json", timer=_timer({}, calls))
    d = _decide(fresh, {"a": never, "b": never})
    assert (d.backend, d.source) == ("b", "cached") and len(calls) == 2
    # and in memory: the same tuner does not even read the file again
    assert _decide(tuner, {"a": never, "b": never}).backend == "b"


def test_a_new_version_decides_again(tuner, monkeypatch):
    tuner.timer = _timer({"a": 1.0, "b": 3.0})
    first = _decide(tuner, {"a": _ok, "b": _ok})
    monkeypatch.setattr(tuning, "__version__", "999.0")
    monkeypatch.setattr(tuning, "_DEVICE_PREFIX", {})
    tuner.timer = _timer({"a": 3.0, "b": 1.0})
    second = _decide(tuner, {"a": _ok, "b": _ok})
    assert first.key != second.key and "fastgen 999.0" in second.key
    assert (first.backend, second.backend) == ("a", "b") and second.source == "measured"
    assert len(json.loads(tuner.path.read_text())["entries"]) == 2


@pytest.mark.parametrize("content", ["{not json", json.dumps({"hello": "world"}),
                                     json.dumps({"format": tuning.FORMAT, "schema": 0, "entries": {}}), "\xff\xfe"])
def test_corrupt_or_foreign_file_is_ignored_with_one_warning_and_rewritten(tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content, errors="surrogateescape") if content != "\xff\xfe" else path.write_bytes(b"\xff\xfe\x00")
    t = tuning.Tuner(path, timer=_timer({"a": 1.0, "b": 2.0}))
    with pytest.warns(FastgenFallbackWarning, match="ignoring") as rec:
        d = _decide(t, {"a": _ok, "b": _ok})
        _decide(t, {"a": _ok, "b": _ok}, key="k-other")
    assert d.backend == "a"
    assert len([w for w in rec if "ignoring" in str(w.message)]) == 1
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT and len(data["entries"]) == 2


def _writer(path, worker, n):
    t = tuning.Tuner(path, timer=lambda name, fn, device: {"a": 1.0, "b": 2.0}[name])
    ref = torch.zeros(4)
    for i in range(n):
        t.decide("attention", tuning.make_key(CPU, "attention", f"w{worker}-{i}"), CPU,
                 {"a": lambda: ref, "b": lambda: ref}, lambda: ref, None, torch.float32, "a")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "autotune.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 60 and {e["backend"] for e in entries.values()} == {"a"}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary left behind


def test_unwritable_folder_keeps_decisions_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t = tuning.Tuner(blocker / "sub" / "autotune.json", timer=_timer({"a": 1.0, "b": 2.0}))
    with pytest.warns(FastgenFallbackWarning, match="cannot write"):
        d = _decide(t, {"a": _ok, "b": _ok})
    assert d.backend == "a" and t.cached(d.key) is d


def test_switched_off_gives_the_static_table(tuner, monkeypatch):
    calls = []
    tuner.timer = _timer({"a": 1.0, "b": 0.5}, calls)
    assert _decide(tuner, {"a": _ok, "b": _ok}, static="a", allow=False).source == "static"
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    assert not tuning.enabled() and tuning.enabled(True)
    assert calls == []


# ------------------------------------------------------------------------ through the ops


@pytest.fixture
def widened(monkeypatch, tuner):
    """On this CPU, let ``auto`` choose between PyTorch and the Triton interpreter (a GPU's choice)."""
    if tuning.timing_allowed(CPU) is not None or attn_mod.triton_can_run_on(CPU) is not None:
        pytest.fail("the Triton interpreter must run here (conftest sets TRITON_INTERPRET=1 on CPU machines)")
    monkeypatch.setattr(attn_mod, "_candidates", lambda q, tensors, biases, lse: ["sdpa", "triton"])
    monkeypatch.setattr(pro_mod, "_candidates", lambda q: ["torch", "triton"])
    ran = []
    run_attn, run_pro = attn_mod._run, pro_mod._run
    monkeypatch.setattr(attn_mod, "_run", lambda name, *a, **kw: (ran.append(name), run_attn(name, *a, **kw))[1])
    monkeypatch.setattr(pro_mod, "_run", lambda name, *a, **kw: (ran.append(name), run_pro(name, *a, **kw))[1])
    return tuner, ran


def _qkv(B=2, H=3, N=37, D=32, seg=19):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    extra = [(torch.randn(1, H, seg, D, generator=g), torch.randn(1, H, seg, D, generator=g))]
    return q, k, v, extra


@pytest.mark.parametrize("fast", ["triton", "sdpa"])
def test_attention_auto_runs_what_measured_fastest(widened, fast):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0 if fast == "triton" else 9.0, "sdpa": 5.0})
    q, k, v, extra = _qkv()
    out = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.5])
    ref = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.5], backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    (d,) = tuner.log
    assert d.backend == fast and d.op == "attention" and "seg32/b1/bias" in d.key and "fp32,D32" in d.key
    ran.clear()
    fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.5])
    assert ran == [fast]  # decided once: the second call only runs the winner


def _fast_wrong_triton(widened, monkeypatch):
    """The Triton candidate measured fastest, with its output 1.5x off."""
    tuner, ran = widened
    tuner.timer = _timer({"triton": 0.1, "sdpa": 5.0})
    run = attn_mod._run
    monkeypatch.setattr(attn_mod, "_run", lambda name, *a, **kw: (lambda o: (o[0] * 1.5, o[1]) if name == "triton" else o)(
        run(name, *a, **kw)))
    return tuner, ran


def test_attention_wrong_kernel_is_never_chosen(widened, monkeypatch):
    tuner, ran = _fast_wrong_triton(widened, monkeypatch)
    q, k, v, extra = _qkv()
    with pytest.warns(FastgenFallbackWarning, match="attention backend 'triton' gave a wrong result"):
        out = fastgen.ops.attention(q, k, v)
    torch.testing.assert_close(out, fastgen.ops.attention(q, k, v, backend="sdpa"))
    assert tuner.log[0].backend == "sdpa"


def test_prologue_auto_in_place_is_not_applied_twice_while_measuring(widened):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0, "torch": 4.0})
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 4, 21, 16, generator=g) for _ in range(2))
    w = torch.rand(16, generator=g) + 0.5
    cos, sin = torch.randn(21, 8, generator=g), torch.randn(21, 8, generator=g)
    kw = dict(q_weight=w, k_weight=w, cos=cos, sin=sin, norm="head", rope="half")
    want = pro_mod.qk_norm_rope(q, k, backend="torch", **kw)
    a, b = q.clone(), k.clone()
    got = pro_mod.qk_norm_rope(a, b, out=(a, b), **kw)  # measured here: candidates write elsewhere
    assert got[0] is a and tuner.log[0].backend == "triton" and tuner.log[0].op == "qk_norm_rope"
    torch.testing.assert_close(a, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, want[1], atol=1e-5, rtol=1e-5)


def test_no_timing_while_compiling_cached_decision_or_static_table(widened):
    tuner, ran = widened
    calls = []
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0}, calls)
    q, k, v, extra = _qkv()

    def f(q, k, v, kc, vc):
        return fastgen.ops.attention(q, k, v, extra_kv=[(kc, vc)])

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, *extra[0])
    assert calls == [] and ran[-1] == "sdpa"  # nothing decided yet: the static table (CPU: sdpa)
    torch.testing.assert_close(out, f(q, k, v, *extra[0]), atol=1e-4, rtol=1e-4)  # eager call decides: triton
    assert sorted(calls) == ["sdpa", "triton"]
    torch._dynamo.reset()
    ran.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(q, k, v, *extra[0])
    assert ran == ["triton"] and len(calls) == 2  # the decision made eagerly, baked in, nothing timed


def test_autotune_off_uses_the_table(widened, monkeypatch):
    tuner, ran = widened
    calls = []
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0}, calls)
    q, k, v, extra = _qkv()
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    fastgen.ops.attention(q, k, v, extra_kv=extra)
    fastgen.ops.attention(q, k, v, extra_kv=extra, autotune=False)
    assert calls == [] and ran == ["sdpa", "sdpa"]  # the table: SDPA on a CPU
    monkeypatch.delenv("FASTGEN_AUTOTUNE")
    fastgen.ops.attention(q, k, v, extra_kv=extra)
    assert sorted(calls) == ["sdpa", "triton"]


def test_cpu_auto_needs_no_decision(tuner):
    q, k, v, extra = _qkv()
    fastgen.ops.attention(q, k, v, extra_kv=extra)
    assert tuner.log == [] and not tuner.path.exists()  # one candidate on a CPU: no key, no file
    assert attn_mod.static_choice(q, [q, k, v], 1) == "sdpa"


def test_keys_separate_what_changes_the_choice():
    q, k, v, extra = _qkv()
    key = attn_mod._shape_key
    base = key(q, k, [], [], False)
    assert key(q, k, extra, [0.0], False) != base
    assert key(q, k, extra, [0.0], False) != key(q, k, extra, [1.0], False) != key(q, k, extra, [-math.inf], False)
    assert key(q, k, [], [], True) != base
    assert key(q.half(), k.half(), [], [], False) != base
    q2 = torch.randn(2, 3, 40, 32)  # same power-of-two bucket as 37 tokens
    assert key(q2, k, [], [], False) == base
    assert tuning.make_key(CPU, "attention", base).startswith(tuning.device_prefix(CPU) + "|attention|")
    assert f"torch {torch.__version__}" in tuning.device_prefix(CPU)


def test_dynamic_shapes_under_compile_use_the_table(widened):
    tuner, ran = widened
    calls = []
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0}, calls)

    def f(q, k, v):
        return fastgen.ops.attention(q, k, v)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    q, k, v, _ = _qkv(N=37)
    out = compiled(q, k, v)
    assert calls == [] and ran == ["sdpa"]  # symbolic sizes: no key, the table, nothing timed
    torch.testing.assert_close(out, f(q, k, v), atol=1e-4, rtol=1e-4)
    q, k, v, _ = _qkv(N=50)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), atol=1e-4, rtol=1e-4)


def _tiny_pipeline_deciding(widened, monkeypatch):
    """(tuner, ran, calls, pipe, call): a tiny Flux pipeline whose patched attention and prologue go
    through the widened candidates, Triton measured fastest."""
    from fastgen import models

    tuner, ran = widened
    # CPU processors run upstream where no fastgen kernel would: here the widened candidates do run.
    base = importlib.import_module("fastgen.patching.processors.base")
    monkeypatch.setattr(base, "attention_uses_kernel", lambda backend, device, dtype: True)
    calls = []
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0, "torch": 3.0}, calls)
    pipe, call = models.build_pipeline("flux", "tiny")
    return tuner, ran, calls, pipe, call


def test_tune_decides_a_pipeline_ahead_of_time(widened, monkeypatch):
    tuner, ran, calls, pipe, call = _tiny_pipeline_deciding(widened, monkeypatch)
    def run():
        return pipe(**call, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    ref = run()
    decisions = fastgen.tune(pipe, **call)
    assert not fastgen.is_patched(pipe)  # patched for the call only
    assert {d.op for d in decisions} == {"attention", "qk_norm_rope"}
    assert all(d.source == "measured" and d.backend == "triton" for d in decisions)
    assert len({d.key for d in decisions}) == len(decisions)
    measured = len(calls)
    with fastgen.patch(pipe):
        out = run()
    assert len(calls) == measured  # the generation itself decides nothing
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    with pytest.raises(RuntimeError, match="autotuning is off"):
        fastgen.tune(pipe, **call)


def test_no_timing_during_cuda_graph_capture(monkeypatch):
    # The check itself; capture proper runs in the gpu test below.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert "CUDA graph" in tuning.timing_allowed(torch.device("cuda"))
    assert tuning.timing_allowed(CPU) is None


@pytest.mark.gpu
def test_capture_uses_the_decision_and_never_times(tuner):
    calls = []
    tuner.timer = lambda name, fn, device: calls.append(name) or 1.0
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 4, 300, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    seg = [(torch.randn(1, 4, 100, 64, device=dev, dtype=torch.bfloat16),) * 2]
    fastgen.ops.attention(q, k, v, extra_kv=seg)  # eager: decides
    decided = len(calls)
    assert decided >= 2 and tuner.log[-1].source == "measured"
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fastgen.ops.attention(q, k, v, extra_kv=seg)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = fastgen.ops.attention(q, k, v, extra_kv=seg)
        q2 = q[:, :, :200]  # a new key during capture: the table, nothing timed
        fastgen.ops.attention(q2, k, v, extra_kv=seg)
    g.replay()
    torch.cuda.synchronize()
    assert len(calls) == decided
    ref = fastgen.ops.attention(q, k, v, extra_kv=seg, backend="sdpa")
    assert (out.float() - ref.float()).abs().max() < 5e-2


def test_demo_and_info_say_what_was_decided_and_why():
    from fastgen.demo import decisions_text

    d = tuning.Decision("attention", tuning.make_key(CPU, "attention", "bf16,D128,bh32,q8192,k8192"), "sdpa:cudnn",
                        "measured", "fastest correct: sdpa:cudnn 1.2 ms (then triton 1.3 ms)", {"sdpa:cudnn": 1.2})
    auto = fastgen.PatchConfig()
    lines = decisions_text([d] * 10, auto, {"compute_capability": "9.0"}, limit=3)
    assert lines[0] == "automatic backends (10 keys):" and len(lines) == 5 and "7 more" in lines[-1]
    assert "attention [bf16,D128,bh32,q8192,k8192] -> sdpa:cudnn (measured; fastest correct" in lines[1]
    assert "on a CPU" in decisions_text([], auto, {"compute_capability": None})[0]
    assert decisions_text([d], fastgen.PatchConfig(attention_backend="sdpa", prologue_backend="torch"), {}) == []


def test_cli_info_lists_the_decisions_file(tmp_path, monkeypatch, capsys):
    from fastgen import cli

    t = tuning.Tuner(tmp_path / "autotune.json", timer=_timer({"a": 1.0, "b": 2.0}))
    monkeypatch.setattr(tuning, "TUNER", t)
    _decide(t, {"a": _ok, "b": _ok}, key="fp16,D64")
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"1 decisions for cpu in {t.path}" in out and "attention [fp16,D64] -> a (measured" in out


# ------------------------------------------------------------------------ what a review broke


def test_non_finite_inputs_decide_nothing_and_a_wrong_kernel_still_never_wins(widened, monkeypatch):
    tuner, ran = _fast_wrong_triton(widened, monkeypatch)
    q, k, v, _ = _qkv()
    bad = q.clone()
    bad[0, 0, 0, 0] = math.inf
    fastgen.ops.attention(bad, k, v)
    assert tuner.log == [] and not tuner.path.exists()  # nothing decided, nothing stored
    with pytest.warns(FastgenFallbackWarning, match="'triton' gave a wrong result"):
        fastgen.ops.attention(q, k, v)  # a finite call decides: the wrong kernel loses
    assert tuner.log[-1].backend == "sdpa"


def test_a_decision_whose_backend_is_gone_is_decided_again(widened, tmp_path):
    tuner, ran = widened
    q, k, v, _ = _qkv()
    key = tuning.make_key(CPU, "attention", attn_mod._shape_key(q, k, [], [], False))
    tuner.path.write_text(json.dumps({"format": tuning.FORMAT, "schema": tuning.SCHEMA, "entries": {
        key: {"op": "attention", "backend": "xformers", "why": "measured elsewhere", "t": 1}}}))
    tuner.timer = _timer({"triton": 1.0, "sdpa": 2.0})
    fastgen.ops.attention(q, k, v)  # xformers is not a candidate here: measured again, no crash
    assert tuner.log[-1].backend == "triton" and tuner.log[-1].source == "measured"
    assert json.loads(tuner.path.read_text())["entries"][key]["backend"] == "triton"


def test_any_candidate_failure_is_cannot_run(tuner):
    class OutOfResources(Exception):  # Triton's errors derive from Exception, not RuntimeError
        pass

    def oor(ref):
        def run():
            raise OutOfResources("out of resource: shared memory")
        return run

    def flaky_timer(name, fn, device):
        if name == "b":
            raise MemoryError("while timing")
        return 1.0

    tuner.timer = flaky_timer
    d = _decide(tuner, {"a": _ok, "b": _ok, "c": oor})
    assert d.backend == "a" and "OutOfResources" in d.rejected["c"] and "while timing" in d.rejected["b"]

    def boom(ref):
        raise torch.cuda.OutOfMemoryError("no room for the float32 copy")
    d = tuner.decide("attention", tuning.make_key(CPU, "attention", "k-oom"), CPU, {"a": _ok(torch.ones(3)),
                     "b": _ok(torch.ones(3))}, lambda: torch.ones(3), boom, torch.float16, "a")
    assert d.source == "measured"  # PyTorch's own error unknown: the dtype's tolerance


def test_switched_off_ignores_earlier_decisions(widened, monkeypatch):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0})
    q, k, v, extra = _qkv()
    fastgen.ops.attention(q, k, v)
    assert tuner.log[-1].backend == "triton"
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("FASTGEN_AUTOTUNE", off)
        ran.clear()
        fastgen.ops.attention(q, k, v)
        assert ran == ["sdpa"], off  # the fixed table, not the decision on record
    ran.clear()
    fastgen.ops.attention(q, k, v, autotune=True)
    assert ran == ["triton"]


@pytest.mark.parametrize("shape", [(2, 3, 0, 32), (0, 3, 37, 32)])
def test_empty_inputs_need_no_decision(widened, shape):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0})
    q = torch.randn(shape)
    k = v = torch.randn(shape[0], 3, 11, 32)
    out = fastgen.ops.attention(q, k, v)
    assert out.shape == q.shape and tuner.log == []
    a, b = pro_mod.qk_norm_rope(torch.randn(2, 4, 0, 16), torch.randn(2, 4, 0, 16), norm="head", rope=None)
    assert a.shape == (2, 4, 0, 16) and tuner.log == []


def test_an_sdpa_backend_that_cannot_take_the_inputs_is_left_out(tuner, monkeypatch, recwarn):
    # PyTorch's cuDNN backend has no CPU kernel: measured alone (strict), it cannot run, quietly.
    monkeypatch.setattr(attn_mod, "_candidates", lambda q, tensors, biases, lse: ["sdpa", "sdpa:cudnn"])
    tuner.timer = _timer({"sdpa": 5.0, "sdpa:cudnn": 1.0})
    q, k, v, extra = _qkv()
    out = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.3])
    d = tuner.log[-1]
    assert d.backend == "sdpa" and "cannot run" in d.rejected["sdpa:cudnn"]
    assert not [w for w in recwarn if issubclass(w.category, FastgenFallbackWarning)]
    # A key decided for it that then meets a shape it cannot take runs PyTorch's choice, warned once.
    with pytest.warns(FastgenFallbackWarning, match="cannot take shape"):
        alt = attn_mod._run("sdpa:cudnn", q, k, v, extra, [0.3], 32 ** -0.5, False)[0]
    torch.testing.assert_close(alt, out)


def test_damaged_files_of_every_kind(tmp_path):
    path = tmp_path / tuning.FILE_NAME
    path.write_text("[" * 100000 + "]" * 100000)  # deep enough to exhaust the parser's recursion
    t = tuning.Tuner(path, timer=_timer({"a": 1.0, "b": 2.0}))
    with pytest.warns(FastgenFallbackWarning, match="ignoring"):
        assert _decide(t, {"a": _ok, "b": _ok}).backend == "a"
    data = json.loads(path.read_text())
    data["entries"].update({f"foreign{i}": {"backend": "x", "t": "yesterday"} for i in range(3)})
    path.write_text(json.dumps(data))
    t2 = tuning.Tuner(path, timer=_timer({"a": 1.0, "b": 2.0}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "MAX_ENTRIES", 2)
        _decide(t2, {"a": _ok, "b": _ok}, key="k-new")
    assert len(json.loads(path.read_text())["entries"]) == 2
    assert tuning.cache_path().name == f"autotune-v{tuning.SCHEMA}.json"


def test_token_major_views_are_a_key_of_their_own():
    x = torch.randn(2, 37, 3, 32)  # (B, S, H, D): what a projection gives
    q_view, q_dense = x.transpose(1, 2), x.transpose(1, 2).contiguous()
    assert attn_mod._shape_key(q_view, q_view, [], [], False) != attn_mod._shape_key(q_dense, q_dense, [], [], False)


def test_tune_refuses_a_compiled_denoiser_and_the_cli_checks_its_arguments(tuner, capsys):
    from fastgen import cli, models

    pipe, call = models.build_pipeline("flux", "tiny")
    pipe.transformer.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="call fastgen.tune before torch.compile"):
        fastgen.tune(pipe, **call)
    for argv, said in ((["tune", "--size", "tiny", "--frames", "5"], "--frames does not apply"),
                       (["tune", "--size", "tiny", "--device", "cuda"] if not torch.cuda.is_available() else
                        ["tune", "--size", "tiny", "--device", "nonsense"], "--device")):
        with pytest.raises(SystemExit, match=said):
            cli.main(argv)
    with pytest.raises(SystemExit):
        cli.main(["tune", "--size", "tiny", "--batch", "0"])
    assert "must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------ what a second review broke


def test_compiled_calls_honour_the_off_switch(widened, monkeypatch):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0})
    q, k, v, _ = _qkv()
    fastgen.ops.attention(q, k, v)  # decided: triton
    for off in ({"env": "0"}, {"arg": False}):
        torch._dynamo.reset()
        if "env" in off:
            monkeypatch.setenv("FASTGEN_AUTOTUNE", off["env"])
        ran.clear()
        torch.compile(lambda q, k, v: fastgen.ops.attention(q, k, v, autotune=off.get("arg")), fullgraph=True,
                      backend="aot_eager")(q, k, v)
        assert ran == ["sdpa"], off  # the fixed table, even with a decision on record
        monkeypatch.setenv("FASTGEN_AUTOTUNE", "1")


def test_the_log_sum_exp_is_checked_too(widened, monkeypatch):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 0.1, "sdpa": 5.0})
    run = attn_mod._run
    monkeypatch.setattr(attn_mod, "_run", lambda name, *a, **kw: (lambda o: (o[0], o[1] + 3.0) if name == "triton"
                                                                   and o[1] is not None else o)(run(name, *a, **kw)))
    q, k, v, extra = _qkv()
    with pytest.warns(FastgenFallbackWarning, match="'triton' gave a wrong result"):
        out, lse = fastgen.ops.attention(q, k, v, extra_kv=extra, return_lse=True)
    assert tuner.log[-1].backend == "sdpa"
    # rows with no admissible key have lse -inf on every backend: equal, not wrong
    monkeypatch.setattr(attn_mod, "_run", run)
    tuner.timer = _timer({"triton": 0.1, "sdpa": 5.0})
    empty = torch.randn(2, 3, 0, 32)
    fastgen.ops.attention(q, empty, empty, return_lse=True)
    assert tuner.log[-1].backend == "triton" and not tuner.log[-1].rejected


def test_prologue_keeps_gradients(widened, recwarn):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 0.1, "torch": 5.0})
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    k = torch.randn(1, 2, 9, 16)
    a, b = pro_mod.qk_norm_rope(q, k, norm="head", rope=None)
    (a.sum() + b.sum()).backward()
    assert q.grad is not None and ran == ["torch"] and tuner.log == []
    with pytest.warns(FastgenFallbackWarning, match="forward-only"):
        a, _ = pro_mod.qk_norm_rope(q, k, norm="head", rope=None, backend="triton")
    assert a.grad_fn is not None


def test_autocast_output_dtype_never_depends_on_a_timing(widened):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 0.1, "sdpa": 5.0})
    q, k, v, _ = _qkv()
    fastgen.ops.attention(q, k, v)  # decided outside autocast: triton (fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastgen.ops.attention(q, k, v)
        want = fastgen.ops.attention(q, k, v, backend="sdpa")
    assert out.dtype == want.dtype == torch.bfloat16 and ran[-2:] == ["sdpa", "sdpa"]


def test_an_op_called_inside_a_candidate_does_not_deadlock(widened, monkeypatch):
    tuner, ran = widened
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0})
    q, k, v, _ = _qkv()
    run = attn_mod._run

    def nested(name, *a, **kw):
        if name == "triton" and kw.get("strict"):
            fastgen.ops.attention(q[:, :, :5], k, v)  # another key, decided while this one is measured
        return run(name, *a, **kw)

    monkeypatch.setattr(attn_mod, "_run", nested)
    fastgen.ops.attention(q, k, v)
    assert tuner.log[-1].backend == "triton"  # the outer key; the inner call got the table, no hang


def test_keys_that_decide_nothing_stop_being_measured(tuner):
    calls = []
    tuner.timer = _timer({"a": 1.0, "b": 2.0}, calls)
    nan = torch.full((4,), math.nan)
    for _ in range(5):
        d = tuner.decide("attention", tuning.make_key(CPU, "attention", "k-nan"), CPU, {"a": lambda: nan, "b": lambda: nan},
                         lambda: nan, None, torch.float16, "b")
    assert d.backend == "b" and d.source == "static" and f"({tuning.MAX_ATTEMPTS} tries)" in d.why
    assert calls == []


def test_odd_file_entries_print_on_one_line(tmp_path, monkeypatch, capsys):
    from fastgen import cli

    path = tmp_path / tuning.FILE_NAME
    key = tuning.make_key(CPU, "attention", "fp16,D64")
    path.write_text(json.dumps({"format": tuning.FORMAT, "schema": tuning.SCHEMA, "entries": {
        key: {"op": None, "backend": "sdpa", "why": "line one\nfake line", "t": 10 ** 400},
        key + "2": {"op": 3, "backend": "triton", "why": "", "t": "x"}}}))
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner(path))
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "? [fp16,D64] -> sdpa (cached; measured earlier: line one fake line)" in out
    assert tuning._stamp({"t": 10 ** 400}) == 0.0


def test_tune_finds_blocks_compiled_one_by_one(tuner):
    from fastgen import models

    pipe, call = models.build_pipeline("flux", "tiny")
    pipe.transformer.transformer_blocks[0].compile(backend="aot_eager")
    with pytest.raises(ValueError, match="compiled already"):
        fastgen.tune(pipe, **call)


def test_the_tolerance_follows_pytorchs_own_error(widened, monkeypatch):
    # fp16: PyTorch's own error against float32 sets the bar (4x), not only the dtype's floor
    tuner, ran = widened
    seen = []
    decide = tuner.decide

    def spy(op, key, device, candidates, reference, pytorch_error, *a, **kw):
        ref = reference()
        seen.append(pytorch_error(ref))
        return decide(op, key, device, candidates, reference, pytorch_error, *a, **kw)

    monkeypatch.setattr(tuner, "decide", spy)
    tuner.timer = _timer({"triton": 1.0, "sdpa": 5.0})
    q, k, v, extra = (t.half() if torch.is_tensor(t) else [tuple(x.half() for x in e) for e in t] for t in _qkv())
    fastgen.ops.attention(q, k, v, extra_kv=extra)
    fastgen.ops.attention(q[:, :, :3], k, v, return_lse=True)
    assert len(seen) == 2 and all(0 < e < 1e-2 for e in seen), seen  # finite: tuples compared alike


def test_patch_config_autotune_false_gives_the_table_for_that_patch(widened, monkeypatch):
    tuner, ran, calls, pipe, call = _tiny_pipeline_deciding(widened, monkeypatch)
    with pytest.raises(ValueError, match="autotune must be None, True or False"):
        fastgen.PatchConfig(autotune="no")
    with fastgen.patch(pipe, autotune=False):
        pipe(**call, num_inference_steps=1, output_type="latent")
    assert calls == [] and tuner.log == [] and set(ran) <= {"sdpa", "torch"}  # the table on a CPU
    with fastgen.patch(pipe):  # None: FASTGEN_AUTOTUNE (on here) measures
        pipe(**call, num_inference_steps=1, output_type="latent")
    assert calls and {d.op for d in tuner.log} == {"attention", "qk_norm_rope"}
