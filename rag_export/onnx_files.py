"""Writing ONNX graphs of any size.

Protobuf refuses messages over 2 GiB, and some generators' graphs are larger (an mBART-50 decoder with
its 250k vocabulary is about 2.8 GB in fp32; T5-3B too). A graph whose weights exceed a threshold keeps
them in one external data file beside it, ``NAME.onnx.data``, which onnxruntime reads from the graph's
directory. Every writer of a graph (the tracer, the optimizer, the precision conversions) goes through
:func:`save_graph`: both files are written under a scratch directory beside the graph and renamed into
place, data first, so a reader never finds a graph without the data it names.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rag_runtime.files import unique_sibling

PROTOBUF_LIMIT = 2**31
# Weights beyond this go to external data: below the limit with room for the graph itself and for what the
# optimizer and the precision conversions add while they hold the whole model in one message.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 3 << 29  # 1.5 GiB


def data_path(path: Path) -> Path:
    """The external data file of the graph at ``path``."""
    return path.with_name(path.name + ".data")


def _tensor_bytes(tensor) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    import onnx

    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weights_bytes(model) -> int:
    """Bytes of the graph's initializers and constant-node tensors (what external data would hold), counted
    without serializing anything: a tensor over 2 GiB cannot be."""
    graph = model.graph
    constants = (a.t for node in graph.node for a in node.attribute if a.HasField("t"))
    return sum(_tensor_bytes(t) for t in graph.initializer) + sum(_tensor_bytes(t) for t in constants)


@contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """A fresh directory beside ``path`` for a tool to write into, removed afterwards."""
    scratch, _ = unique_sibling(path, lambda p: p.mkdir())
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_graph(model, path: Path, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> bool:
    """Write ``model`` (fully loaded: no external data left unread) to ``path``, its weights in
    ``NAME.onnx.data`` when they exceed ``threshold`` bytes; a stale data file is removed. The model's
    tensors are moved out of it when saved with external data: do not use it afterwards.

    Returns:
        Whether the graph has external data.
    """
    import onnx

    with scratch_dir(path) as scratch:
        tmp = scratch / path.name
        if weights_bytes(model) > threshold:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path(path).name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        external = data_path(tmp).exists()  # no data file when every tensor is under the 1 KiB kept inline
        if external:
            os.replace(data_path(tmp), data_path(path))
        os.replace(tmp, path)
        if not external:
            data_path(path).unlink(missing_ok=True)
    return external


def adopt_graph(written: Path, path: Path, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> bool:
    """Save the graph a tool wrote at ``written`` (with whatever external data it put beside it) as
    ``path`` by :func:`save_graph`'s rule."""
    import onnx

    return save_graph(onnx.load(str(written)), path, threshold)


def place_graph(written: Path, path: Path, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> bool:
    """Move a freshly written graph into place: as it is when it is one self-contained file under the
    threshold (the common case costs a rename), else through :func:`adopt_graph`."""
    alone = [p for p in written.parent.iterdir() if p != written] == []
    if alone and written.stat().st_size <= threshold:
        os.replace(written, path)
        data_path(path).unlink(missing_ok=True)
        return False
    return adopt_graph(written, path, threshold)
