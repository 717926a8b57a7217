"""``export()``: checkpoint in, validated artifact directory out (written atomically).

This module checks the arguments, loads the checkpoint and stages the output directory;
:mod:`rag_export.build` fills it: a loop over the graph registry (:mod:`rag_export.graphs.registry`) that
traces each graph (:mod:`rag_export.tracing`), optionally fuses, validates against PyTorch, optionally
reduces precision and measures the drift; then tokenizers, the knowledge index and the manifest.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rag_runtime.errors import require
from rag_runtime.files import check_output_dir, replace_dir, unique_sibling
from rag_runtime.progress import step

from .errors import ExportError
from .judge import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from .onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")
QUANTIZATIONS = ("int8",)


def export(
    model,
    output_dir: str | Path,
    *,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    strict: bool = False,
    context_encoder: str | None = None,
    include_index: bool = True,
    quantize: str | None = None,
    precision: str = "fp32",
    optimize: bool = False,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    quantize_retrieval: bool = False,
) -> Path:
    """Export a RAG checkpoint into an artifact directory for ``rag_runtime``.

    Args:
        model: Hub id, local checkpoint directory, or an already loaded ``Checkpoint``.
        output_dir: Where to write; must be empty or absent unless ``force``.
        force: Replace a non-empty ``output_dir`` (only once the new export has succeeded).
        opset: ONNX opset.
        validate: Compare every graph in onnxruntime against PyTorch (:mod:`rag_export.judge`).
        atol: Absolute part of each output's validation tolerance.
        rtol: Part of the tolerance proportional to the output's largest reference magnitude.
        strict: Fail validation on any excess over the tolerance or any changed top-k decision (by
            default a small excess is recorded, and only decisions changed beyond near-ties or a gross
            excess fail).
        context_encoder: Also export this DPR context encoder (hub id or directory).
        include_index: Export the checkpoint's custom knowledge base.
        quantize: ``"int8"``: dynamic int8 quantization of the graphs' weights (CPU). The fp32 graphs are
            validated first; the int8 drift against PyTorch is measured and recorded, not enforced. The
            question (and context) encoder stays fp32: int8 embeddings retrieve other passages.
        precision: ``"fp32"`` or ``"fp16"`` (for GPUs): fp16 weights and arithmetic, with LayerNorm,
            softmax and normalization statistics kept in fp32, the KV cache exchanged in fp16, and logits,
            embeddings and the RAG-Token head (the marginalization) in fp32. The fp32 graphs are validated
            first; the fp16 drift against PyTorch fp32 is measured and recorded, not enforced.
        optimize: Run onnxruntime's transformer optimizer over the encoder and decoder graphs (residual
            add + LayerNorm and bias + GELU fusions) before validation, so what is validated is what ships.
        external_data_threshold: A graph whose weights exceed this many bytes keeps them in one external
            data file beside it (``NAME.onnx.data``): protobuf cannot hold a graph over 2 GiB.
        quantize_retrieval: With ``quantize="int8"``, quantize the question and context encoders too.

    Returns:
        The output directory.

    Raises:
        ExportError: On any user-facing problem; nothing is left behind.
        MissingDependencyError: The export extra is not installed.
    """
    output_dir = Path(output_dir)
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unsupported quantization {quantize!r}; supported are: {', '.join(QUANTIZATIONS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision {precision!r}; supported are: {', '.join(PRECISIONS)}")
    if quantize and precision != "fp32":
        raise ExportError("--quantize int8 works on fp32 graphs; drop --precision fp16 (or the quantization)")
    if quantize_retrieval and quantize != "int8":
        raise ExportError("--quantize-retrieval goes with --quantize int8; add it (or drop --quantize-retrieval)")
    check_output_dir(output_dir, force)
    require("torch", "export", "rag-export")
    require("transformers", "export", "rag-export")
    from .build import build_artifact
    from .checkpoint import Checkpoint, load_checkpoint

    if isinstance(model, Checkpoint):
        ckpt = model
    else:
        with step(logger, f"loading {model}"):
            ckpt = load_checkpoint(str(model))
    with staging_dir(output_dir) as tmp:
        manifest = build_artifact(ckpt, tmp, opset=opset, validate=validate, tol=Tolerance(atol, rtol, strict),
                                  context_encoder=context_encoder, include_index=include_index,
                                  reduced=quantize or (precision if precision != "fp32" else None),
                                  optimize=optimize, external_data_threshold=external_data_threshold,
                                  quantize_retrieval=quantize_retrieval)
        manifest.save(tmp)
    from .summary import export_summary

    for line in export_summary(output_dir, manifest, ckpt.model.config):
        logger.info(line)
    return output_dir


def export_context_encoder(source: str, output_dir: str | Path, *, force: bool = False, opset: int = DEFAULT_OPSET,
                           validate: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                           strict: bool = False) -> Path:
    """Export only a DPR context encoder, for ``rag-index build``: ``context_encoder.onnx``, its tokenizer
    and a manifest listing them."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, force)
    require("torch", "export", "rag-export-index context-encoder")
    from .build import build_context_encoder_artifact

    with staging_dir(output_dir) as tmp:
        build_context_encoder_artifact(source, tmp, opset=opset, validate=validate,
                                       tol=Tolerance(atol, rtol, strict)).save(tmp)
    logger.info("wrote %s; next: rag-index build PASSAGES KB_DIR --context-encoder %s", output_dir, output_dir)
    return output_dir


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh directory beside ``target`` that replaces it when the block succeeds and is removed when
    it fails (Ctrl-C included), so ``target`` is never half written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = unique_sibling(target, lambda p: p.mkdir())
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["DEFAULT_ATOL", "DEFAULT_OPSET", "DEFAULT_RTOL", "export", "export_context_encoder", "staging_dir"]
