"""Which int8 MatMul pays on this CPU: fp32 MatMul, dynamic int8 (MatMulInteger, what ``--quantize int8``
writes) and onnxruntime's 8-bit weight-only MatMulNBits (accuracy level 0 and 4, blocks of 32 and 128), one
single-op graph per shape of the base workload, threads 2, fastest of 1 s of runs.

    pip install onnx-ir==1.1.0          # onnxruntime's MatMulNBits quantizer needs it (not a project dependency)
    python -m benchmarks.investigations.int8_kernels

Measured here (AVX2, no VNNI; onnxruntime 1.32.0; load about 0.4), milliseconds:

| [m, k] x [k, n] | fp32 | dynamic int8 | NBits acc 0 | NBits acc 4 (block 128) |
|---|---:|---:|---:|---:|
| [20, 768] x [768, 50265] | 16.1 | 7.0 | 198 | 14.6 |
| [20, 768] x [768, 3072] | 0.72 | 0.36 | 4.0 | 0.81 |
| [20, 3072] x [3072, 768] | 0.76 | 0.46 | 3.2 | 0.81 |
| [790, 768] x [768, 3072] | 27.6 | 15.4 | 26.8 | 32.1 |

Dynamic int8 is about twice as fast as fp32 and twice as fast as the best MatMulNBits setting, so the export
keeps MatMulInteger.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ((20, 768, 50265), (20, 768, 3072), (20, 3072, 768), (20, 768, 768), (790, 768, 3072))


def _matmul_model(m: int, k: int, n: int):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * 0.05
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _ms(path: Path, m: int, k: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 2, 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    times, end = [], time.perf_counter() + 1.0
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        sess.run(None, {"a": a})
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger().setLevel(logging.ERROR)  # the quantizers log every node on the root logger
    tmp = Path(tempfile.mkdtemp())
    print("| [m, k] x [k, n] | fp32 | dynamic int8 | NBits acc 0 | NBits acc 4 (block 128) |\n|---|---:|---:|---:|---:|")
    for m, k, n in SHAPES:
        onnx.save(_matmul_model(m, k, n), tmp / "fp32.onnx")
        quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True)
        row = [_ms(tmp / "fp32.onnx", m, k), _ms(tmp / "dynamic.onnx", m, k)]
        for level in (0, 4):
            config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=level, bits=8)
            quantizer = MatMulNBitsQuantizer(onnx.load(str(tmp / "fp32.onnx")), algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(tmp / "nbits.onnx"))
            row.append(_ms(tmp / "nbits.onnx", m, k))
        print(f"| [{m}, {k}] x [{k}, {n}] | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
