"""The device benchmark's own rules, without a model: how sides are named and refused, which pairs must agree,
and which weight bytes a decode step's memory floor counts."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.device import SideSpec, parity_pairs, parse_side, streamed_weight_bytes


def test_sides_parse_and_bad_ones_say_what_is_accepted():
    assert parse_side("transformers:cuda:fp16:sdpa") == SideSpec("transformers", "cuda", "fp16", "sdpa")
    assert parse_side("runtime:cuda:fp32:tf32").name == "runtime-cuda-fp32-tf32"
    for bad, says in (("runtime:tpu:fp32", "DEVICE in"), ("runtime:cuda:fp16:tf32", "not accepted here"),
                      ("runtime:cpu:fp32:sdpa", "not accepted here"), ("transformers:cpu", "expected KIND")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_side(bad)


def test_only_exact_fp32_runtime_and_transformers_on_one_device_must_agree():
    specs = [parse_side(s) for s in ("runtime:cuda:fp32", "runtime:cpu:fp32", "transformers:cpu:fp32:eager",
                                     "transformers:cuda:fp32:eager", "runtime:cuda:fp16",
                                     "runtime:cuda:fp32:tf32", "transformers:cuda:fp32:eager:tf32")]
    assert sorted(parity_pairs(specs)) == ["runtime-cpu-fp32 vs transformers-cpu-fp32-eager",
                                           "runtime-cuda-fp32 vs transformers-cuda-fp32-eager"]


def test_streamed_weights_leave_out_tables_only_gathered_from(tmp_path):
    rng = np.random.default_rng(0)
    table, shared, dense = (rng.standard_normal(shape).astype(np.float32) for shape in ((50, 8), (50, 8), (8, 8)))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e1"]),       # an embedding lookup: a row per token
             helper.make_node("Gather", ["shared", "ids"], ["e2"]),      # tied: gathered and ...
             helper.make_node("Add", ["e1", "e2"], ["e"]),
             helper.make_node("MatMul", ["e", "dense"], ["h"]),
             helper.make_node("Gemm", ["h", "shared"], ["logits"], transB=1)]  # ... read whole by the LM head
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 50])],
                              [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (shared, "shared"),
                                                                          (dense, "dense"))])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert streamed_weight_bytes(path) == shared.nbytes + dense.nbytes
