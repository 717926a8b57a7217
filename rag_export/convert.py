"""Graph rewrites after tracing: onnxruntime's transformer fusions, fp16 conversion, int8 quantization."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from rag_runtime import constants as C

from .onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD, adopt_graph, save_graph, scratch_dir

# Kept in fp32 in fp16 graphs: normalization statistics, softmax and everything exponential/logarithmic.
FP32_OPS = ["LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Exp",
            "Log", "ReduceLogSumExp"]
# IO kept in fp32 in fp16 graphs (the KV cache, in and out, travels in fp16).
FP32_IO = [C.QUESTION_EMBEDDING, C.PASSAGE_EMBEDDING, C.ENCODER_HIDDEN_STATES, C.LOGITS]


@contextmanager
def _quiet_root_logger():
    """onnxruntime's tools log on the root logger (every pattern not found, optional pre-processing)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def optimize(path: Path, model_type: str, heads: int, hidden: int,
             threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> str:
    """Fuse in place with onnxruntime's transformer optimizer; returns the fused operators and counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_root_logger():
        optimized = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                   opt_level=0)
    fused = ", ".join(f"{op} x{n}" for op, n in optimized.get_fused_operator_statistics().items() if n)
    with scratch_dir(path) as scratch:
        # The optimizer's own save sorts the graph and declares the com.microsoft domain of fused nodes;
        # external data always, so that a graph of any size can be written.
        optimized.save_model_to_file(str(scratch / path.name), use_external_data_format=True)
        adopt_graph(scratch / path.name, path, threshold)
    return fused


def quantize_int8(path: Path, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> None:
    """Dynamic int8 weights (per channel) for MatMul and Gemm, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with scratch_dir(path) as scratch, _quiet_root_logger():
        quantize_dynamic(str(path), str(scratch / path.name), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
        adopt_graph(scratch / path.name, path, threshold)


def convert_fp16(path: Path, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> None:
    """fp16 weights and arithmetic in place, with :data:`FP32_OPS` and :data:`FP32_IO` kept in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    io = onnx.load(str(path), load_external_data=False).graph
    keep = [v.name for v in (*io.input, *io.output) if v.name in FP32_IO]
    # From the path, the converter infers shapes with infer_shapes_path, which works past 2 GiB.
    save_graph(convert_float_to_float16(str(path), keep_io_types=keep, op_block_list=FP32_OPS), path, threshold)


REDUCED_PRECISIONS = {
    "int8": (quantize_int8, "quantizing graphs to int8 (dynamic, weights per channel)"),
    "fp16": (convert_fp16, "converting graphs to fp16 (LayerNorm, softmax, logits in fp32)"),
}


def io_dtypes(path: Path) -> dict[str, str]:
    """Element type name of every graph input and output, as the file declares it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            for v in (*model.graph.input, *model.graph.output)}
