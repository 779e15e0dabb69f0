"""The ``fastgen`` command: ``fastgen info``, ``demo``, ``tune``, ``bench``, ``export`` (``export onnx``,
``export plan``) and ``fractal``."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from pathlib import Path

from fastgen.constants import ATTENTION_BACKENDS


def _device(value: str | None):
    """The torch device ``value`` names (``fastgen.benchmarks.core.parse_device``); ValueError with a one-line
    reason."""
    from fastgen.benchmarks.core import parse_device

    return parse_device(value)


def _device_arg(value: str | None):
    try:
        return _device(value)
    except ValueError as exc:
        raise SystemExit(f"fastgen: {exc}") from None


def _prepare_interpreter(device, interpret: bool | None) -> None:
    # On a machine without a GPU the Triton kernels can still run, slowly, under the interpreter.
    if device.type == "cpu" and interpret is not False and "fastgen.kernels._common" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cmd_info(args) -> int:
    import torch

    device = _device_arg(args.device)
    _prepare_interpreter(device, args.interpret)
    import fastgen
    from fastgen._cuda import CUDA_EXT_ERROR, HAVE_CUDA_EXT
    from fastgen.kernels._common import HAVE_TRITON, INTERPRET, TRITON_IMPORT_ERROR

    print(f"fastgen {fastgen.__version__}")
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    if HAVE_TRITON:
        import triton

        print(f"triton {triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if INTERPRET else ""))
    else:
        print(f"triton: missing ({TRITON_IMPORT_ERROR})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm {cap})")
    else:
        print("no CUDA device")
    print("compiled kernels (fastgen._C): " + ("built (qk_norm_rope, quantize_fp8)" if HAVE_CUDA_EXT else f"not available: {CUDA_EXT_ERROR}"))
    print(f"attention backends on {device}:")
    for name, reason in fastgen.ops.available_backends(device).items():
        print(f"  {name:9s} " + ("available" if reason is None else f"unavailable: {reason}"))
    try:
        import diffusers

        print(f"diffusers {diffusers.__version__}")
    except ImportError:
        print("diffusers: missing")
    _print_decisions(device)
    return 0


def _print_decisions(device) -> None:
    from fastgen.ops import autotune as tuning

    state = "on" if tuning.enabled() else "off (FASTGEN_AUTOTUNE=0: the fixed table)"
    decisions = tuning.decisions(device)
    print(f"automatic backends: autotuning {state}; {len(decisions)} decisions for {device} in {tuning.TUNER.path}")
    if device.type != "cuda":
        print(f"  on {device.type} there is nothing to decide: PyTorch runs attention and the prologue")
    for d in sorted(decisions, key=lambda d: (d.op, d.key)):
        print("  " + tuning.describe(d))


def cmd_bench(args) -> int:
    _quiet_transformers()
    device = _device_arg(args.device)
    _prepare_interpreter(device, args.interpret)
    from tqdm import tqdm

    from fastgen import benchmarks as B

    if args.suite != "all" and args.suite not in B.SUITES:
        raise SystemExit(f"fastgen bench: --suite must be all or one of {', '.join(B.SUITES)}, got {args.suite!r}")
    suites = list(B.SUITES) if args.suite == "all" else [args.suite]
    env = B.environment(device)
    results = []
    for suite in suites:
        with tqdm(desc=f"bench {suite}", unit="run", leave=False, disable=args.quiet) as bar:
            results += B.SUITES[suite](device, budget_s=args.budget, progress=bar.update)
    print(B.markdown_table(results, env))
    if args.out:
        j, m = B.save(results, env, args.out, f"bench-{device.type}")
        print(f"wrote {j} and {m}")
    return 0


def _quiet_transformers() -> None:
    # Importing diffusers' pipelines makes transformers log notices about its optional image backends
    # (torchvision); this program uses none of them. Set TRANSFORMERS_VERBOSITY to see them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _pipeline(args):
    """(pipe, call kwargs, description, device, dtype) from --model or --family/--size, --height/--width."""
    import torch

    from fastgen import demo

    device = _device_arg(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model:
        pipe, call = demo.load_pipeline(args.model, dtype)
        what = f"{type(pipe).__name__} from {args.model}"
        demo.place(pipe, device)
    else:
        size = args.size or ("large" if device.type == "cuda" else "small")
        pipe, call = demo.build_pipeline(args.family, size)
        what = f"built-in {args.family} pipeline ({size}, random weights)"
        demo.place(pipe, device, dtype)
    if args.height or args.width:  # one of them alone: a square
        call.update(height=args.height or args.width, width=args.width or args.height)
    if "height" in call:
        what += f", {call['height']}x{call['width']}"
    call = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in call.items()}
    return pipe, call, what, device, dtype


def cmd_tune(args) -> int:
    _quiet_transformers()
    import fastgen
    from fastgen.ops import autotune as tuning

    import inspect

    pipe, call, what, device, dtype = _pipeline(args)
    takes = inspect.signature(pipe.__call__).parameters
    if args.frames:
        if "num_frames" not in takes:
            raise SystemExit(f"fastgen tune: {type(pipe).__name__} makes images: --frames does not apply")
        call["num_frames"] = args.frames
    if args.batch > 1:
        per_prompt = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if n in takes), None)
        if per_prompt is None:
            raise SystemExit(f"fastgen tune: {type(pipe).__name__} takes no batch size (--batch)")
        call[per_prompt] = args.batch
    try:
        decisions = fastgen.tune(pipe, num_inference_steps=args.steps, **call)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"fastgen tune: {exc}") from None
    print(f"fastgen tune: {what}, {dtype}, on {device}")
    if not decisions:
        print(f"  nothing to decide on {device}: " + ("PyTorch runs every attention and prologue on a CPU"
                                                      if device.type != "cuda" else "every key was decided before"))
    for d in decisions:
        print("  " + tuning.describe(d))
    print(f"decisions file: {tuning.TUNER.path} ({len(tuning.decisions(device))} for this device; "
          f"{tuning.TUNER.spent_s * 1e3:.0f} ms spent deciding here)")
    return 0


def cmd_demo(args) -> int:
    _quiet_transformers()
    import torch
    from tqdm import tqdm

    from fastgen import benchmarks as B
    from fastgen import demo
    from fastgen.patching.config import PatchConfig

    if args.task != "patch" and not args.model and args.family != "flux":
        raise SystemExit(f"--task {args.task} runs on Flux; drop --family {args.family}")
    merging_row = args.tome is None and args.todo is None and _device_arg(args.device).type != "cuda"
    if (args.task == "patch" and merging_row and not (args.model or args.size or args.height or args.width)
            and args.family in CPU_DEMO_SIDE_FAMILIES):
        # the default ToMe row shows what merging saves where it saves something: at 256^2 a small
        # model's 256 image tokens cost less to attend than to merge; at 1024^2 its 4096 do not
        args.height = args.width = CPU_DEMO_SIDE
    pipe, call, what, device, dtype = _pipeline(args)
    what += f", {args.steps} steps, {dtype}"
    env = B.environment(device)
    if args.task != "patch" and "height" not in call:  # a checkpoint: its default size
        call.update(height=pipe.default_sample_size * pipe.vae_scale_factor,
                    width=pipe.default_sample_size * pipe.vae_scale_factor)
    if args.task == "condition":
        with tqdm(total=3 * args.repeats, desc="demo runs", unit="run", disable=args.quiet) as bar:
            result = demo.compare_conditions(pipe, call, steps=args.steps, repeats=args.repeats, device=device,
                                             conditions=args.conditions, progress=bar.update)
        print(demo.report_conditions(result, env, what))
        return 0
    if args.task == "edit":
        with tqdm(total=3, desc="demo runs", unit="run", disable=args.quiet) as bar:
            result = demo.compare_edit(pipe, call, steps=args.steps, repeats=args.repeats, device=device,
                                       mask_fraction=args.mask_fraction, progress=bar.update)
        print(demo.report_edit(result, env, what))
        return 0 if result["background_exact"] else 1
    config = PatchConfig(attention_backend=args.attention_backend, fuse_prologue=not args.no_fuse_prologue)
    tome, todo = args.tome, args.todo
    if tome is None and todo is None and device.type != "cuda":
        tome = DEFAULT_CPU_TOME  # no kernel speed to show without a GPU: show what merging saves, and its cost
    approximate = [PatchConfig.build(config, tome=tome or None, todo=todo)] if (tome or todo) else []
    with tqdm(total=(2 + len(approximate)) * args.repeats + 1, desc="demo runs", unit="run",
              disable=args.quiet) as bar:
        result = demo.compare(pipe, call, steps=args.steps, repeats=args.repeats, device=device, config=config,
                              approximate=approximate, progress=bar.update)
    print(demo.report(result, env, what))
    return 0 if result["unpatch_bit_exact"] else 1


def _export_model(source: str, dtype, device="cpu"):
    """(denoiser, what it is) for ``fastgen export onnx``: a family of ``fastgen.export.plan.FAMILIES``
    built with random weights (seed 0), else a model or pipeline folder or Hub id through the class's
    ``from_pretrained`` (its transformer or unet). Built directly in ``dtype`` (no float32 copy first).
    On ``device="meta"`` it is built from its config with no weights (a folder's weights are not read)."""
    import diffusers

    from fastgen.export.plan import FAMILIES, build, load_config

    meta = " (meta: no weights)" if str(device) == "meta" else ""
    if source in FAMILIES:
        family = FAMILIES[source]
        return family.build(device, dtype), f"{family.cls} {source} " + (meta.lstrip() or "(random weights)")
    cls, config, subfolder = load_config(source)
    what = f"{cls} from {source}" + (f" ({subfolder})" if subfolder else "") + meta
    if meta:
        return build(cls, config, "meta", dtype), what
    model = getattr(diffusers, cls).from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    return model.eval(), what


# Linux's estimate of the memory a new allocation can have without swapping; elsewhere, no check.
_MEMINFO = Path("/proc/meminfo")


def _available_memory() -> int | None:
    """Bytes of host memory available (``MemAvailable`` of /proc/meminfo), None where unknown."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _weights_exceed_memory(source: str, dtype) -> str | None:
    """Where ``source``'s weights in ``dtype`` (counted on the meta device, ``fastgen.export.plan``)
    exceed the available host memory: the error in words; else None (also where memory is unknown)."""
    import torch

    from fastgen.export.plan import PRECISIONS, weight_bytes

    available = _available_memory()
    if available is None:
        return None
    model, what = _export_model(source, dtype, "meta")
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    params, needed, _ = weight_bytes(model, PRECISIONS[precision])
    if needed <= available:
        return None
    return (f"{source}'s weights need {needed / 2**30:.2f} GiB ({params / 1e9:.3f} B parameters in "
            f"{str(dtype).removeprefix('torch.')}), {available / 2**30:.2f} GiB of host memory is available: "
            f"pass --meta to export its graph without weights (or a smaller --dtype)")


def _export_errors() -> tuple[type[BaseException], ...]:
    """What an export can fail with beyond bad arguments: torch.onnx's errors (RuntimeError), onnx's
    checker and onnxruntime's own exception types (which derive from Exception only)."""
    errors: list[type[BaseException]] = [RuntimeError, MemoryError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        errors += [t for t in vars(ort_state).values() if isinstance(t, type) and issubclass(t, Exception)]
    except ImportError:
        pass
    try:
        import onnx.checker
        import onnx.shape_inference

        errors += [onnx.checker.ValidationError, onnx.shape_inference.InferenceError]
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _usage_error(command: str, message: str) -> int:
    # after parsing, as argparse does for what it checks itself: one line, exit status 2
    print(f"fastgen {command}: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _quiet_exporter():
    # torch.onnx logs a warning for every torchvision op it cannot register (torchvision is not
    # needed here): noise between the progress bar and the summary.
    import logging

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def cmd_export_onnx(args) -> int:
    _quiet_transformers()
    import torch

    from fastgen.export import operators, to_onnx

    command = "export onnx"
    dtype = getattr(torch, args.dtype)
    validate = not (args.no_validate or args.meta)  # a meta model has no weights to run
    if dtype == torch.bfloat16 and validate:
        return _usage_error(command, "onnxruntime's CPU provider cannot run bfloat16 graphs: add --no-validate "
                                     "(or export float16 / float32)")
    try:
        if not args.meta:
            too_big = _weights_exceed_memory(args.model, dtype)
            if too_big:
                return _usage_error(command, too_big)
        model, what = _export_model(args.model, dtype, "meta" if args.meta else "cpu")
    except (ValueError, OSError) as exc:
        return _usage_error(command, str(exc).splitlines()[0])
    if not args.quiet:
        print(f"fastgen export onnx: {what} -> {args.out}", file=sys.stderr)
    out = Path(args.out)
    before = out.stat().st_mtime_ns if out.exists() else None
    try:
        with _quiet_exporter():
            report = to_onnx(model, args.out, height=args.height, width=args.width, frames=args.frames,
                             batch=args.batch, dtype=dtype, opset=args.opset, target=args.target,
                             validate=validate, progress=not args.quiet)
    except ValueError as exc:
        # written by this run, then refused by the target's operator check: name the failing nodes
        if args.target and out.exists() and out.stat().st_mtime_ns != before:
            failing = operators.check_operators(out, args.target)
            if failing:
                print(export_failures(failing, args.target, out))
                return 1
        return _usage_error(command, str(exc).splitlines()[0])
    except _export_errors() as exc:
        # the arguments were fine: the export or onnxruntime's validation failed (exit status 1)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"fastgen export onnx: export failed: {type(exc).__name__}: {first}".rstrip(": "), file=sys.stderr)
        return 1
    weights = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    print(export_summary(report, what, weights))
    return 0


def export_failures(failing, target: str, path) -> str:
    """The lines naming every node ``target`` refuses (``operators.Unsupported`` s) in ``path``."""
    lines = [f"{path}: {len(failing)} node(s) would fail on {target} (the graph is kept, for inspection):"]
    return "\n".join(lines + [f"  {u}" for u in failing])


def export_summary(report, what: str, weight_names=()) -> str:
    """``fastgen export onnx``'s summary of an ``ExportReport``: the file, its inputs and output with
    their symbolic dimensions, the declared ranges, each validated shape's difference from PyTorch and
    the target's operator check. A meta export's weights are graph inputs: those named in
    ``weight_names`` (parameter and buffer names, with or without the exporter's first prefix) are
    counted, not listed."""
    def dims(d):
        return "[" + ", ".join(map(str, d)) + "]"

    def span(lo, hi):
        return f"{lo}" if lo == hi else f"{lo}-{hi if hi is not None else 'any'}"

    data = f", weights in {report.path.name}.data" if report.external_data else ""
    lines = [f"wrote {report.path} ({report.file_bytes / 2**20:.1f} MiB{data}): {what}, opset {report.opset}, "
             f"{str(report.dtype).removeprefix('torch.')}, exported in {report.export_seconds:.1f} s", "inputs:"]
    names = set(weight_names)

    def is_weight(name):
        return not report.weights and (name in names or name.partition(".")[2] in names)

    inputs = {name: d for name, d in report.inputs.items() if not is_weight(name)}
    width = max(map(len, list(inputs) + list(report.outputs)))
    lines += [f"  {name:{width}}  {dims(d)}" for name, d in inputs.items()]
    if len(inputs) < len(report.inputs):
        lines.append(f"  and {len(report.inputs) - len(inputs)} weights as graph inputs (--meta: the graph "
                     f"holds no weights)")
    lines += ["output:"] + [f"  {name:{width}}  {dims(d)}" for name, d in report.outputs.items()]
    lines.append("ranges: " + ", ".join(f"{k} {span(*v)}" + (" px" if k in ("height", "width") else "")
                                        for k, v in report.ranges.items()))
    if report.checks:
        lines.append(f"validated with onnxruntime (CPU) against PyTorch in {report.validate_seconds:.1f} s:")
        for c in report.checks:
            frames = f", {c.frames} frames" if c.frames else ""
            lines.append(f"  batch {c.batch}, {c.height}x{c.width} px{frames}, {c.text_tokens} text tokens: "
                         f"max abs diff {c.max_abs_diff:.2e} ({c.max_rel_diff:.2e} of the largest output)")
    else:
        lines.append("not validated (--no-validate)" if report.weights else "not validated (--meta: no weights)")
    if report.target:
        lines.append(f"operator check for {report.target}: every node supported")
    return "\n".join(lines)


def cmd_export_plan(args) -> int:
    from fastgen.export.plan import plan

    kwargs = {k: getattr(args, k) for k in ("batch", "height", "width", "frames", "text_tokens")}
    if args.workspace is not None:
        kwargs["workspace_bytes"] = args.workspace
    if args.reserve is not None:
        kwargs["reserve_bytes"] = args.reserve
    try:
        p = plan(args.model, precision=args.precision, vram_bytes=args.vram, **kwargs)
    except (ValueError, OSError) as exc:
        return _usage_error("export plan", str(exc).splitlines()[0])
    print(p.table())
    return 0 if p.fits else 1


def _size_range(text: str):
    """"N" -> N, "MIN:MAX" -> (MIN, MAX): positive whole numbers, MIN <= MAX."""
    parts = text.split(":")
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N or MIN:MAX: {text!r}") from None
    if len(values) > 2 or min(values) < 1 or values[0] > values[-1]:
        raise argparse.ArgumentTypeError(f"must be a positive N or MIN:MAX with MIN <= MAX, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _bytes_arg(allow_zero: bool):
    def parse(text: str) -> int:
        from fastgen.export.plan import parse_bytes

        try:
            return parse_bytes(text, allow_zero=allow_zero)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _precision(text: str) -> str:
    from fastgen.export.plan import PRECISIONS

    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(PRECISIONS)}, got {text!r}")
    return text


def _export_target(text: str) -> str:
    from fastgen.export.operators import target

    try:
        target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def export_args(sub) -> None:
    """``fastgen export onnx`` and ``fastgen export plan``."""
    ex = sub.add_parser("export", help="export a denoiser to ONNX; plan a TensorRT engine for a card's memory")
    commands = ex.add_subparsers(dest="export_command", required=True, metavar="{onnx,plan}")
    o = commands.add_parser("onnx", help="export a denoiser to ONNX with dynamic shapes, validated with onnxruntime",
                            description="Export the denoiser (transformer or unet) to ONNX with dynamic batch, "
                            "size and text length (fastgen.export.to_onnx), check it, validate it with "
                            "onnxruntime and print a summary. Exit status 1 where --target refuses a node or the export fails, "
                            "2 where the weights would not fit in host memory (try --meta).")
    o.add_argument("model", metavar="MODEL_OR_FAMILY",
                   help="a diffusers model or pipeline folder or Hub id, or a built-in family with random weights "
                        "(flux:tiny, sd15:small, flux-dev, ...: fastgen.export.plan.FAMILIES)")
    o.add_argument("out", metavar="OUT.onnx", help="the ONNX file (weights above 2 GiB go to OUT.onnx.data)")
    for name, what in (("height", "pixels"), ("width", "pixels"), ("batch", "items"), ("frames", "video frames")):
        o.add_argument(f"--{name}", type=_size_range, metavar="A[:B]",
                       help=f"{what}: fixed A, or the range A to B (default: all the model accepts)")
    o.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and inputs (default float32)")
    o.add_argument("--opset", type=_positive, help="ONNX opset (default: 20, or the newest the --target parses)")
    o.add_argument("--target", type=_export_target, help="check every node against a runtime: onnxruntime, "
                   "onnxruntime:<ExecutionProvider>, tensorrt-10.1, tensorrt-10.14, tensorrt-10.15")
    o.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    o.add_argument("--meta", action="store_true", help="build the model on the meta device and export its graph "
                   "only (weights become graph inputs; no validation): a released size's graph and operator "
                   "check without the memory for its weights")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.set_defaults(func=cmd_export_onnx)

    pl = commands.add_parser("plan", help="weights, activations and the weight-streaming budget on a card",
                             description="Weight bytes, the activation memory of one forward per shape and the "
                             "TensorRT weight-streaming budget that fits a card (fastgen.export.plan). Exit "
                             "status 1 where nothing fits.")
    pl.add_argument("model", metavar="FAMILY_OR_MODEL",
                    help="a family (flux-dev, sd15, sdxl, sd3.5-medium, wan2.1-1.3b, hunyuanvideo, flux:tiny, ...), "
                         "a diffusers model or pipeline folder or Hub id (its config only)")
    pl.add_argument("--precision", type=_precision, default="bf16", help="bf16 (default), fp16, fp8 or fp32")
    pl.add_argument("--vram", type=_bytes_arg(False), required=True, metavar="SIZE",
                    help="the card's memory: 8GiB, 8 (GiB), 8GB, 12288MiB")
    for name, what in (("batch", "items per forward"), ("height", "pixels"), ("width", "pixels"),
                       ("frames", "video frames (4k + 1)"), ("text-tokens", "prompt tokens")):
        pl.add_argument(f"--{name}", type=_size_range, metavar="A[:B]",
                        help=f"{what}: A, or A:B for two profiles (every minimum, every maximum); "
                             "default: the family's usual shape")
    pl.add_argument("--workspace", type=_bytes_arg(True), default=None, metavar="SIZE",
                    help="TensorRT's tactic workspace (default 1GiB)")
    pl.add_argument("--reserve", type=_bytes_arg(True), default=None, metavar="SIZE",
                    help="CUDA context, runtime and slack (default 1GiB)")
    pl.set_defaults(func=cmd_export_plan)


# ``fastgen fractal``: class labels drawn when none are given (the official demo's ImageNet classes).
FRACTAL_LABELS = {"digits": list(range(10)), "imagenet": [207, 360, 387, 974, 88, 979, 417, 279]}


def _labels_arg(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if items == [""]:
        raise argparse.ArgumentTypeError("no class label given")
    if "" in items:  # "1,,2" or "1,2,": a label left out by mistake, not a shorter list
        raise argparse.ArgumentTypeError(f"class labels are comma-separated integers with none empty, got {text!r}")
    try:
        return [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"class labels are comma-separated integers, got {text!r}") from None


def _image_out(text: str) -> Path:
    """``--out``: a path whose extension names a format Pillow writes (.png, .jpg, .webp, ...)."""
    from PIL import Image

    Image.init()
    path = Path(text)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text!r} needs an image extension Pillow writes, such as .png, .jpg or "
                                         ".webp" + (f" ({path.suffix} is not one)" if path.suffix else ""))
    return path


def _writable_parent(path: Path) -> None:
    """Create ``path``'s folder; ValueError with a one-line reason where it cannot be, or ``path`` is a folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ValueError(f"--out {path}: cannot create its folder, {exc.filename} is a file") from None
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create its folder {path.parent} ({exc.strerror})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"--out {path}: " + ("a folder, not a file" if path.is_dir() else
                                              f"cannot write into {path.parent}"))


def _state_dict(path: str) -> dict:
    """A state dict from ``path`` (an official checkpoint's ``"model"`` entry, or a plain state dict);
    ValueError with a one-line reason."""
    from fastgen.fractal.model import load_checkpoint

    try:
        return load_checkpoint(path)
    except FileNotFoundError:
        raise ValueError(f"--weights {path}: no such file") from None
    except ValueError as exc:
        raise ValueError(f"--weights {exc}") from None


def _fractal_model(args, torch):
    """(model, what) from --preset / --weights; raises ValueError with a one-line reason."""
    from fastgen import fractal
    from fastgen.fractal import digits

    config = digits.DIGITS_CONFIG if args.preset == "digits" else fractal.get_config(args.preset)
    if not args.weights:
        if args.preset == "digits":
            return digits.load_digits_model(), "digits model (trained, fastgen/fractal/weights/digits.pt)"
        return fractal.FractalGen(config), f"{args.preset} with random weights (pass --weights for a checkpoint)"
    state = _state_dict(args.weights)
    with torch.device("meta"):  # the layout first, without the memory or the time of the real model
        layout = fractal.FractalGen(config)
    # meta tensors in, so the load is a check of names and shapes (a real tensor into a meta parameter is a
    # no-op that torch warns about, once per tensor)
    layout.load_state_dict({k: v.to("meta") for k, v in state.items()})
    model = fractal.FractalGen(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model, f"{args.preset} from {args.weights}"


def cmd_fractal(args) -> int:
    import time

    import torch

    from fastgen.fractal import image_grid, sample

    try:
        device = _device(args.device)
        _writable_parent(args.out)  # before sampling, which may take minutes
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        if args.threads or (device.type == "cpu" and args.preset == "digits"):
            torch.set_num_threads(args.threads or 1)  # the digits model's ops are tiny: threads only wait on each other
        model, what = _fractal_model(args, torch)
        labels = args.labels or FRACTAL_LABELS["digits" if args.preset == "digits" else "imagenet"]
        model = model.to(device=device, dtype=dtype).eval()
        from fastgen.fractal import PRESET_SAMPLING
        from fastgen.fractal.digits import DIGITS_SAMPLING

        published = DIGITS_SAMPLING if args.preset == "digits" else PRESET_SAMPLING[args.preset]
        args.cfg = published["cfg"] if args.cfg is None else args.cfg
        args.temperature = published["temperature"] if args.temperature is None else args.temperature
        settings = dict(sampler=args.sampler, cfg=args.cfg, temperature=args.temperature, seed=args.seed,
                        num_iter=args.num_iter, progress=not args.quiet)
        t0 = time.perf_counter()
        images = sample(model, labels, **settings)
        seconds = time.perf_counter() - t0
        grid = image_grid(images, nrow=args.nrow, scale=args.scale)
    except ValueError as exc:
        return _usage_error("fractal", str(exc).splitlines()[0])
    from PIL import Image

    out = args.out
    try:
        Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(out)
    except (OSError, ValueError) as exc:  # the folder went away, a full disk, a format without RGB
        return _usage_error("fractal", f"--out {out}: cannot write it ({type(exc).__name__}: "
                                       f"{str(exc).strip().splitlines()[0][:160]})")
    side = images.shape[-1]
    count = f"{len(labels)} image" + ("s" if len(labels) != 1 else "")
    print(f"wrote {out}: {count} of {side}x{side} (labels {labels}) from {what}; sampler "
          f"{args.sampler}, cfg {args.cfg}, temperature {args.temperature}, seed {args.seed}, {device} "
          f"{str(dtype).removeprefix('torch.')}; {seconds:.2f} s")
    return 0


def fractal_args(sub) -> None:
    """``fastgen fractal``: sample a grid of FractalGen images to an image file. (``fastgen.fractal`` is
    imported when the command runs, not here: its import costs a second every other command would pay.)"""
    f = sub.add_parser("fractal", help="sample class-conditional FractalGen images into an image grid (PNG)",
                       description="Sample images from a FractalGen model (fastgen.fractal.sample) and write them as "
                       "one image grid (PNG by default; --out's extension picks the format). --preset digits is "
                       "the tiny model trained on 16x16 digits (its weights ship with fastgen); the published "
                       "presets have random weights unless --weights names a checkpoint (the official 'model' state "
                       "dict). Exit status 2 on bad arguments, --out included.")
    f.add_argument("--preset", default="digits", metavar="NAME",
                   help="digits (default), or a published config: a name of fastgen.fractal.PRESETS such as "
                        "fractalmar_in64 (an unknown name lists them)")
    f.add_argument("--weights", metavar="PATH", help="a checkpoint or state dict for the preset's layout")
    f.add_argument("--labels", type=_labels_arg, metavar="A,B,...",
                   help="class labels, one image each (default: 0..9 for digits, eight ImageNet classes otherwise)")
    f.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, >= 1 (default: the "
                   "preset's published one; digits: fastgen.fractal.digits.DIGITS_SAMPLING)")
    f.add_argument("--temperature", type=float, default=None, help="multiplies the logits, > 0 (default: the "
                   "preset's published one, as --cfg)")
    f.add_argument("--num-iter", type=_num_iter, default=None, metavar="N[,N...]",
                   help="iterations of every MAR level, or one value per level (AR levels: ignored, one per token; "
                        "default: the config's)")
    f.add_argument("--seed", type=int, default=0, help="sampling seed in [0, 2**64) (default 0)")
    f.add_argument("--sampler", default="block", help="block (default) or reference")
    f.add_argument("--out", type=_image_out, default="fractal.png", metavar="PATH",
                   help="the grid's image file; its extension picks the format: .png (default fractal.png), or any "
                        "other Pillow writes (.jpg, .webp, ...); missing folders on its path are created")
    f.add_argument("--nrow", type=_positive, default=None, help="images per grid row (default: about square)")
    f.add_argument("--scale", type=_positive, default=None,
                   help="nearest-neighbour upscaling of each image (default: to at least 64 px)")
    f.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    f.add_argument("--dtype", choices=DTYPES, help="default bf16 on GPU, fp32 on CPU")
    f.add_argument("--threads", type=_positive, default=None,
                   help="torch.set_num_threads on a CPU (default: 1 for digits, torch's own otherwise)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fractal)

    def error(message):  # one line, exit status 2 (argparse prints its usage first)
        f.exit(2, f"{f.prog}: error: {message}\n")

    f.error = error


DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_CPU_TOME = 0.5  # the ToMe row a demo without a GPU adds (--tome 0 drops it)
CPU_DEMO_SIDE = 1024  # ... on images of this side, for the image families, unless a size is given
CPU_DEMO_SIDE_FAMILIES = ("flux", "sd3", "sd15", "sdxl")


def _tome_ratio(text: str) -> float:
    # checked as fastgen.ToMeConfig checks it, so a bad ratio is a usage error, not a traceback
    from fastgen.merging import ToMeConfig

    try:
        ratio = float(text)
        if ratio != 0:
            ToMeConfig(ratio)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "ratio" in str(e) else f"not a ratio: {text!r}") from None
    return ratio


def _todo_factor(text: str) -> int:
    from fastgen.merging import ToDoConfig

    try:
        factor = int(text)
        if factor in (0, 1):
            return 0  # no downsampling, as todo=0 / 1 in fastgen.patch
        ToDoConfig(factor)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "factor" in str(e) else f"not an integer factor: {text!r}") from None
    return factor


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _num_iter(text: str) -> int | tuple[int, ...]:
    """``N`` (every MAR level) or ``N1,N2,...`` (one per level, as ``fractal.sample``'s ``num_iter``)."""
    values = tuple(_positive(v.strip()) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def pipeline_args(sp) -> None:
    """The arguments that choose a pipeline (read by ``_pipeline``): a checkpoint or a built-in one."""
    from fastgen.models import FAMILIES, SIZES

    sp.add_argument("--family", choices=FAMILIES, default="flux", help="architecture of the built-in pipeline (default flux)")
    sp.add_argument("--size", choices=tuple(SIZES), help="built-in pipeline size (default: large on a GPU, small on a CPU)")
    sp.add_argument("--model", help="a local diffusers checkpoint folder instead of the built-in pipeline")
    sp.add_argument("--height", type=_positive)
    sp.add_argument("--width", type=_positive)
    sp.add_argument("--dtype", choices=DTYPES, help="default bf16 on GPU, fp32 on CPU")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastgen", description="fast kernels for diffusion pipelines")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if present)")
        sp.add_argument("--interpret", action=argparse.BooleanOptionalAction, default=None,
                        help="run Triton kernels under the interpreter on CPU (default: on where there is no GPU)")

    info = sub.add_parser("info", help="versions, devices, and which backends and compiled kernels are available")
    common(info)
    info.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="run a pipeline unpatched and patched; print time, speed-up, difference, memory")
    d.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    d.add_argument("--task", choices=["patch", "condition", "edit"], default="patch",
                   help="patch: fastgen.patch vs diffusers (default); condition: image conditions with vs without "
                        "the K/V cache; edit: KV-Edit vs a full generation (Flux)")
    d.add_argument("--conditions", type=int, default=1, help="--task condition: how many image conditions")
    d.add_argument("--mask-fraction", type=float, default=0.25, help="--task edit: share of the image edited")
    pipeline_args(d)
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    d.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    d.add_argument("--no-fuse-prologue", action="store_true")
    d.add_argument("--tome", type=_tome_ratio, help="also run token merging at this ratio (approximate; its deviation is "
                   f"reported). Default: {DEFAULT_CPU_TOME} without a GPU, off on a GPU; 0 turns it off")
    d.add_argument("--todo", type=_todo_factor, help="also run token downsampling of self-attention K/V by this factor "
                   "(approximate; with --tome, both in one row)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tune", help="decide the automatic backends of a pipeline at one size ahead of time")
    t.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    pipeline_args(t)
    t.add_argument("--frames", type=_positive, help="num_frames, for video pipelines")
    t.add_argument("--batch", type=_positive, default=1, help="images (videos) per prompt (default 1)")
    t.add_argument("--steps", type=_positive, default=2, help="denoising steps to run (default 2)")
    t.set_defaults(func=cmd_tune)

    bench = sub.add_parser("bench", help="run the benchmark suites and print baseline-vs-fastgen tables")
    common(bench)
    bench.add_argument("--suite", default="all", help="a suite of fastgen.benchmarks.SUITES, or all (default)")
    bench.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row (default 1)")
    bench.add_argument("--out", help="write JSON and markdown results to this folder")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)

    export_args(sub)
    fractal_args(sub)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
