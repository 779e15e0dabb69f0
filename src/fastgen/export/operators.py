"""Which ONNX operators a target runtime runs, and the check that names every node it would refuse,
before a user spends an engine build (or a deployment) on a graph.

Targets:

- ``"onnxruntime"``: read live from the installed onnxruntime (its registered kernels, per execution
  provider: ``"onnxruntime"`` is the CPU provider, ``"onnxruntime:CUDAExecutionProvider"`` another).
- ``"tensorrt-10.1"``, ``"tensorrt-10.14"``, ``"tensorrt-10.15"``: TensorRT's ONNX parser, kept as data
  (``tensorrt_operators.json``: the support matrix of onnx-tensorrt's ``docs/operators.md`` for 10.1 and
  the changes later releases state: ``Attention`` from 10.14, ``RMSNormalization`` from 10.15), so the
  check runs where TensorRT cannot be installed (these machines).

A node fails a target when its operator is not supported there, when its domain is not the default
ONNX one (custom ops; TensorRT's parser accepts only registered plugins), or when the model's opset is
outside the target's range. Function-typed nodes (local functions the exporter emits) are checked
through their bodies, as the runtime would inline them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DOMAINS = ("", "ai.onnx")
_DATA = Path(__file__).with_name("tensorrt_operators.json")


@dataclass(frozen=True)
class Target:
    """What a runtime accepts: operators of the default domain, the opset range, and per-operator
    restrictions to say beside a node (not checked: they depend on values only a build sees)."""

    name: str
    operators: frozenset[str]
    min_opset: int | None = None
    max_opset: int | None = None
    restrictions: tuple[tuple[str, str], ...] = ()
    domains: frozenset[str] = frozenset()  # non-default domains it runs (onnxruntime's com.microsoft)

    def restriction(self, op: str) -> str:
        return dict(self.restrictions).get(op, "")


@dataclass(frozen=True)
class Unsupported:
    """One node a target refuses: where it is (``node`` name, or the function it sits in), why."""

    node: str
    op_type: str
    domain: str
    reason: str

    def __str__(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain not in DEFAULT_DOMAINS else self.op_type
        return f"{self.node} ({op}): {self.reason}"


def tensorrt_releases() -> list[str]:
    """The TensorRT releases with operator data, oldest first."""
    return list(_tensorrt_data()["releases"])


@functools.cache
def _tensorrt_data() -> dict:
    return json.loads(_DATA.read_text())


@functools.cache
def target(name: str) -> Target:
    """The ``Target`` called ``name`` (see the module doc).

    Raises:
        ValueError: for an unknown target, naming the known ones.
    """
    if name == "onnxruntime" or name.startswith("onnxruntime:"):
        provider = name.partition(":")[2] or "CPUExecutionProvider"
        return _onnxruntime_target(name, provider)
    if name.startswith("tensorrt-"):
        release = name.removeprefix("tensorrt-")
        releases = _tensorrt_data()["releases"]
        if release in releases:
            return _tensorrt_target(name, release, releases)
    known = ["onnxruntime", "onnxruntime:<ExecutionProvider>"] + [f"tensorrt-{r}" for r in tensorrt_releases()]
    raise ValueError(f"unknown export target {name!r}; the targets are {known}")


def _tensorrt_target(name: str, release: str, releases: dict) -> Target:
    chain = []
    while release is not None:  # a release is its base plus the operators it adds
        chain.append(releases[release])
        release = releases[release].get("base")
    ops, restrictions = set(), {}
    for entry in reversed(chain):
        for op, info in entry.get("operators", {}).items():
            if info["supported"]:
                ops.add(op)
                if info.get("restrictions"):
                    restrictions[op] = info["restrictions"]
        ops.update(entry.get("add", ()))
    top = chain[0]
    return Target(name, frozenset(ops), top.get("min_opset", chain[-1].get("min_opset")), top["max_opset"],
                  tuple(sorted(restrictions.items())))


def _onnxruntime_target(name: str, provider: str) -> Target:
    from onnxruntime.capi import _pybind_state as C

    ops, domains = set(), set()
    for kernel in C.get_all_opkernel_def():
        if kernel.provider != provider:
            continue
        if kernel.domain in DEFAULT_DOMAINS:
            ops.add(kernel.op_name)
        else:
            domains.add(kernel.domain)
    if not ops:
        raise ValueError(f"onnxruntime has no kernels for {provider!r} here; its providers: "
                         f"{sorted({k.provider for k in C.get_all_opkernel_def()})}")
    return Target(name, frozenset(ops), domains=frozenset(domains))


def _load(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        return onnx.load(str(model), load_external_data=False)  # the graph only: weights are not needed
    raise ValueError(f"model must be an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}")


def check_operators(model, target_name: str) -> list[Unsupported]:
    """Every node of ``model`` (an ``onnx.ModelProto`` or a path) that ``target_name`` would refuse,
    in graph order, subgraphs and local functions included; empty when the graph is fine.

    Raises:
        ValueError: for an unknown target or a model that is neither a ModelProto nor a path.
    """
    model = _load(model)
    t = target(target_name)
    out: list[Unsupported] = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is not None and t.max_opset is not None and not (t.min_opset or 0) <= opset <= t.max_opset:
        out.append(Unsupported("<model>", "opset_import", "", f"opset {opset} is outside {t.name}'s "
                               f"{t.min_opset}-{t.max_opset}"))
    functions = {(f.domain, f.name): f for f in model.functions}
    seen_functions: set = set()

    def visit(nodes, where: str):
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:  # a local function: its body is what runs
                if key not in seen_functions:
                    seen_functions.add(key)
                    visit(functions[key].node, f"{where}{node.op_type}/")
                continue
            name = where + (node.name or f"<{node.op_type}>")
            if node.domain in DEFAULT_DOMAINS:
                if node.op_type not in t.operators:
                    out.append(Unsupported(name, node.op_type, node.domain, f"{t.name} has no {node.op_type}"))
            elif node.domain not in t.domains:
                out.append(Unsupported(name, node.op_type, node.domain,
                                       f"{t.name} does not run operators of domain {node.domain!r}"))
            for attr in node.attribute:  # If / Loop / Scan bodies
                if attr.g is not None and len(attr.g.node):
                    visit(attr.g.node, f"{name}/")
                for g in attr.graphs:
                    visit(g.node, f"{name}/")

    visit(model.graph.node, "")
    return out


def require_supported(model, target_name: str) -> None:
    """``check_operators``, raising when anything fails.

    Raises:
        ValueError: naming every node ``target_name`` would refuse (and why), so a user sees it before
            an engine build; or for an unknown target.
    """
    bad = check_operators(model, target_name)
    if bad:
        listed = "\n  ".join(str(u) for u in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} node(s) would fail on {target_name}:\n  {listed}")
