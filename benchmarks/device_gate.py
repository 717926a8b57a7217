"""The device run's gate: onnxruntime grants the CUDA provider, and fp32 stays fp32 unless TF32 is asked for.

    python -m benchmarks.device_gate --device cuda --out DIR        # writes DIR/gate.json, exit 3 if refused

One MatMul graph ([512, 1024] x [1024, 1024], random fp32 inputs, a constant weight as in the exports) goes
through ``rag_runtime.sessions.create_session``: a session onnxruntime does not run on CUDA fails here with the
library that is missing, before any model is loaded. On CUDA it runs with ``use_tf32=0`` (the runtime's default)
and ``use_tf32=1``; each result's relative error against a float64 product says which arithmetic ran (fp32
lands near 1e-7, TF32's 10-bit mantissa near 1e-4). Exit 4 if ``use_tf32=0`` is not fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

FP32_LIMIT = 1e-5  # fp32 with fp32 accumulation over k=1024 stays far below; TF32 lands far above


def _matmul_graph(path: Path, weight: np.ndarray, rows: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "gate",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    # IR 8 as the exports have: onnx 1.23 writes IR 14 by default, which onnxruntime 1.30 refuses.
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def gate(device: str) -> dict:
    import onnxruntime

    from rag_runtime.sessions import create_session, session_report

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 1024), dtype=np.float32)
    w = rng.standard_normal((1024, 1024), dtype=np.float32)
    want = a.astype(np.float64) @ w.astype(np.float64)
    report = {"onnxruntime": onnxruntime.__version__, "available_providers": onnxruntime.get_available_providers(),
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        _matmul_graph(path, w, a.shape[0])
        for label, options in ([("use_tf32=0", None), ("use_tf32=1", {"use_tf32": 1})] if device == "cuda"
                               else [("cpu", None)]):
            session = create_session(path, device, provider_options=options)
            (got,) = session.run(None, {"a": a})
            error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            report["runs"][label] = {"relative_error": error, **session_report(session)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--out", type=Path, default=None, help="write gate.json here")
    args = p.parse_args(argv)
    from rag_runtime import RagError

    try:
        report = gate(args.device)
    except RagError as e:  # the CUDA provider refused: one line, the library it could not load
        print(f"gate: {e}", file=sys.stderr)
        return 3
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gate.json").write_text(json.dumps(report, indent=2))
    for label, run in report["runs"].items():
        print(f"gate {label}: {run['providers'][0]}, relative error {run['relative_error']:.2e}, "
              f"placement {run.get('placement')}")
    exact = report["runs"].get("use_tf32=0", report["runs"].get("cpu"))
    if exact["relative_error"] > FP32_LIMIT:
        print(f"gate: fp32 MatMul has relative error {exact['relative_error']:.2e} > {FP32_LIMIT:g}: TF32 (or worse) "
              "is on although use_tf32=0 was asked for", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
