"""One graph traced to ONNX with its spec's names and dynamic axes, and the check that the tracer kept them."""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import ExportError
from .onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD, place_graph, scratch_dir


def trace(module, spec, args: tuple, out_dir: Path, opset: int,
          external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> Path:
    """Trace ``module`` with ``args`` into ``out_dir / spec.file`` with the spec's names and dynamic axes;
    weights beyond ``external_data_threshold`` bytes go to ``spec.file + ".data"`` (:mod:`rag_export.onnx_files`)."""
    import torch

    path = out_dir / spec.file
    with scratch_dir(path) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Past 2 GiB the tracer writes every tensor to a file of its own beside the graph: hence a scratch
        # directory, from which the graph is placed with at most one data file.
        traced = scratch / path.name
        torch.onnx.export(
            module, args, str(traced), input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False, do_constant_folding=True,
        )
        _check_io_names(traced, spec)
        place_graph(traced, path, external_data_threshold)
    return path


def _check_io_names(path: Path, spec) -> None:
    """The tracer drops inputs the module never reads and names the rest positionally: a module that
    ignores one input would get every later name wrong. Refuse that instead of writing a misnamed graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got = [v.name for v in model.graph.input], [v.name for v in model.graph.output]
    if got != (list(spec.inputs), list(spec.outputs)):
        missing = [n for n in (*spec.inputs, *spec.outputs) if n not in (*got[0], *got[1])]
        raise ExportError(f"the traced {spec.name} graph does not have the IO its spec declares (missing or "
                          f"renamed: {', '.join(missing) or 'order differs'}): its module ignores an input")
