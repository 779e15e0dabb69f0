"""fastgen.export.operators: which ONNX operators each target runs, kept as data for TensorRT (which
cannot be installed here) and read live from onnxruntime; the check names every node a target would
refuse, on hand-built graphs and on a real torch.onnx export at opset 20 (decomposed forms) and 23
(``Attention``, ``RMSNormalization``)."""

import collections

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx import helper as h  # noqa: E402

from fastgen.export.operators import check_operators, require_supported, target, tensorrt_releases  # noqa: E402

TARGETS = ["onnxruntime", "tensorrt-10.1", "tensorrt-10.14", "tensorrt-10.15"]


def _graph(nodes, opset=23, extra_opsets=()):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                  h.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                     [h.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset), *extra_opsets])


def test_targets_and_their_opset_ranges():
    assert tensorrt_releases() == ["10.1", "10.14", "10.15"]
    t101, t1014, t1015 = (target(f"tensorrt-{r}") for r in tensorrt_releases())
    assert (t101.min_opset, t101.max_opset) == (9, 20)
    assert "Attention" not in t101.operators and "Attention" in t1014.operators and "Attention" in t1015.operators
    assert "RMSNormalization" not in t1014.operators and "RMSNormalization" in t1015.operators
    assert {"MatMul", "Softmax", "LayerNormalization", "Conv", "Resize"} <= t101.operators
    assert {"Bernoulli", "DFT", "Unique"}.isdisjoint(t1015.operators)  # unsupported in the 10.1 matrix
    assert "2D or 3D" in t101.restriction("Conv") or t101.restriction("Conv") == ""
    ort = target("onnxruntime")
    assert {"Attention", "RMSNormalization", "MatMul"} <= ort.operators and "com.microsoft" in ort.domains
    with pytest.raises(ValueError, match="unknown export target 'tensorrt-9.0'.*tensorrt-10.15"):
        target("tensorrt-9.0")
    with pytest.raises(ValueError, match="no kernels for 'NoSuchExecutionProvider'"):
        target("onnxruntime:NoSuchExecutionProvider")


def test_every_refused_node_is_named_with_its_reason():
    model = _graph([h.make_node("RMSNormalization", ["x", "s"], ["y"], name="norm0"),
                    h.make_node("Attention", ["y", "y", "y"], ["z"], name="attn0"),
                    h.make_node("Plugin", ["z"], ["out"], domain="custom", name="c0")],
                   extra_opsets=[h.make_opsetid("custom", 1)])
    found = {t: [(u.node, u.op_type) for u in check_operators(model, t)] for t in TARGETS}
    assert found["onnxruntime"] == [("c0", "Plugin")]
    assert found["tensorrt-10.15"] == [("c0", "Plugin")]
    assert found["tensorrt-10.14"] == [("norm0", "RMSNormalization"), ("c0", "Plugin")]
    assert found["tensorrt-10.1"] == [("<model>", "opset_import"), ("norm0", "RMSNormalization"),
                                      ("attn0", "Attention"), ("c0", "Plugin")]
    with pytest.raises(ValueError, match=r"(?s)4 node\(s\) would fail on tensorrt-10.1:.*attn0 \(Attention\)"):
        require_supported(model, "tensorrt-10.1")
    with pytest.raises(ValueError, match="onnx.ModelProto or a path"):
        check_operators(object(), "onnxruntime")


def test_nodes_inside_functions_and_subgraphs_are_checked(tmp_path):
    body = h.make_graph([h.make_node("Attention", ["x", "x", "x"], ["b"], name="inner")], "body", [],
                        [h.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    fn = h.make_function("local", "Block", ["x"], ["o"], [h.make_node("DFT", ["x"], ["o"], name="dft")],
                         [h.make_opsetid("", 20)])
    model = _graph([h.make_node("Block", ["x"], ["y"], domain="local", name="call"),
                    h.make_node("If", ["c"], ["out"], name="branch", then_branch=body, else_branch=body)],
                   opset=20, extra_opsets=[h.make_opsetid("local", 1)])
    model.functions.append(fn)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert [(u.node, u.op_type) for u in check_operators(path, "tensorrt-10.1")] == [
        ("Block/dft", "DFT"), ("branch/inner", "Attention"), ("branch/inner", "Attention")]


@pytest.mark.parametrize("opset", [20, 23])
def test_a_real_export_meets_the_targets_its_opset_allows(opset, recwarn):
    class Block(torch.nn.Module):  # RMS-norm and attention, as a DiT block has them
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(16)

        def forward(self, x):
            q = self.norm(x).unflatten(-1, (2, 8)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)

    model = torch.onnx.export(Block(), (torch.randn(1, 5, 16),), dynamo=True, opset_version=opset,
                              verbose=False).model_proto
    ops = collections.Counter(n.op_type for n in model.graph.node)
    refused = {t: {u.op_type for u in check_operators(model, t)} for t in TARGETS}
    if opset == 23:  # the fused forms: only the newest TensorRT parses both
        assert ops["Attention"] == 1 and ops["RMSNormalization"] == 1
        assert refused == {"onnxruntime": set(), "tensorrt-10.15": set(), "tensorrt-10.14": {"RMSNormalization"},
                           "tensorrt-10.1": {"opset_import", "Attention", "RMSNormalization"}}
    else:  # decomposed (MatMul-Softmax-MatMul, Pow/ReduceMean/Sqrt): every target
        assert "Attention" not in ops and {"MatMul", "Softmax", "ReduceMean"} <= set(ops)
        assert all(not r for r in refused.values()), refused
