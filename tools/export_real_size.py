"""The released denoisers exported at their real sizes, on a machine with less memory than their
weights: each model is built on the ``meta`` device from its released config (``fastgen.models``:
Flux-dev 12B, SDXL, SD3.5-medium, Wan 2.1 1.3B, HunyuanVideo 13B), so no weight is allocated, and
exported by ``fastgen.export.to_onnx`` with every dimension dynamic. The graph (weights as graph
inputs) passes ``onnx.checker``; each TensorRT target's operator check runs on it.

This proves the trace at full depth and width (every block, the real attention and RoPE sizes, the
released layouts' branches), the symbolic dimensions and the operator forms. It cannot prove numbers:
those come from the tiny and small configs, which run (tests/test_export_onnx.py).

    python tools/export_real_size.py --out bench/results/export_real_size.md
    python tools/export_real_size.py --models flux-dev --opset 23 --target tensorrt-10.15

Writes a Markdown table (one row per model: parameters, graph nodes, the hidden-state input's dims,
export seconds, peak resident memory of this process, nodes each target refuses) with the machine,
versions and commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name -> (diffusers class, config name in fastgen.models)
    "flux-dev": ("FluxTransformer2DModel", "FLUX_DEV"),
    "sdxl": ("UNet2DConditionModel", "SDXL_UNET"),
    "sd3.5-medium": ("SD3Transformer2DModel", "SD35_MEDIUM"),
    "wan2.1-1.3b": ("WanTransformer3DModel", "WAN21_1_3B"),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", "HUNYUAN_VIDEO"),
}
TARGETS = ("tensorrt-10.1", "tensorrt-10.14", "tensorrt-10.15", "onnxruntime")


def export_one(name: str, opset: int | None, target: str | None, workdir: Path) -> dict:
    import diffusers
    import onnx
    import torch

    from fastgen import models
    from fastgen.export import to_onnx
    from fastgen.export.operators import check_operators

    cls, config = MODELS[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**getattr(models, config))
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    report = to_onnx(model, workdir / f"{name}.onnx", opset=opset, target=target, validate=False, progress=True)
    seconds = time.perf_counter() - start
    graph = onnx.load(str(report.path), load_external_data=False)
    refused = {t: len(check_operators(graph, t)) for t in TARGETS}
    latent = report.inputs[next(iter(report.inputs))]
    return dict(name=name, params=params, nodes=len(graph.graph.node), latent=latent, opset=report.opset,
                seconds=seconds, rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, refused=refused)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--target", default=None, help="to_onnx's target (operator forms + check)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    logging.disable(logging.WARNING)  # torch.onnx's per-op notices

    import onnx
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            # one process per model: the peak memory column is that model's, not the largest so far
            out = subprocess.run([sys.executable, __file__, "--_one", name, "--_opset", str(args.opset),
                                  "--_target", str(args.target), "--_dir", tmp], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))  # the child's result
            r = rows[-1]
            print(f"{name}: {r['params'] / 1e9:.2f}B params, {r['nodes']} nodes, {r['seconds']:.0f} s, "
                  f"{r['rss_gib']:.1f} GiB peak, refused {r['refused']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# Real-size ONNX exports (meta device, no weights allocated)\n",
             f"{datetime.date.today()} | {platform.node()} ({platform.machine()}, CPU only) | python "
             f"{platform.python_version()} | torch {torch.__version__} | onnx {onnx.__version__} | commit {commit}\n",
             f"`python tools/export_real_size.py` (opset {args.opset or 'default'}, target {args.target}). "
             "Every dimension dynamic; the graph passes `onnx.checker`; weights are graph inputs. Nodes "
             "refused per target by `fastgen.export.operators.check_operators` (0: the target parses every node).\n",
             "| model | params | opset | graph nodes | latent input dims | export s | peak RSS GiB | "
             + " | ".join(f"refused: {t}" for t in TARGETS) + " |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in TARGETS) + " |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e9:.2f}B | {r['opset']} | {r['nodes']} | "
                     f"{', '.join(map(str, r['latent']))} | {r['seconds']:.0f} | {r['rss_gib']:.1f} | "
                     + " | ".join(str(r["refused"][t]) for t in TARGETS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    if "--_one" in sys.argv:  # the child: one model, its result dict on the last stdout line
        a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        logging.disable(logging.WARNING)
        opset = None if a["--_opset"] == "None" else int(a["--_opset"])
        target = None if a["--_target"] == "None" else a["--_target"]
        print(json.dumps(export_one(a["--_one"], opset, target, Path(a["--_dir"]))))
        sys.exit(0)
    sys.exit(main())
