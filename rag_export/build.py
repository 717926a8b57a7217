"""What an export directory holds, built into a staging directory: every graph of the registry (traced,
fused, validated, reduced), the tokenizers, the index and the manifest. Needs torch; :func:`rag_export.export`
is the entry point."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rag_runtime import constants as C
from rag_runtime.artifact import Manifest, TokenizerFile
from rag_runtime.progress import step

from . import convert
from .checkpoint import Checkpoint
from .errors import ExportError
from .graphs.families import family_for
from .graphs.registry import GRAPHS, ContextEncoderSource, ExportContext, GraphEntry
from .hub import resolve
from .judge import MEASURE_ONLY, Tolerance
from .manifest import build_manifest, tokenizer_entry
from .onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD
from .tracing import trace

logger = logging.getLogger(__name__)


def build_artifact(ckpt: Checkpoint, out: Path, *, opset: int, validate: bool, tol: Tolerance,
                   context_encoder: str | None, include_index: bool, reduced: str | None,
                   optimize: bool, external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
                   quantize_retrieval: bool = False) -> Manifest:
    """Write every graph, tokenizer and the index of ``ckpt`` into ``out``; return its manifest."""
    family = family_for(ckpt.model.generator.config)
    ctx = ExportContext(out=out, checkpoint=ckpt, family=family, dims=family.dims(ckpt.model.generator.config),
                        context_encoder=_load_context_encoder(context_encoder) if context_encoder else None,
                        external_data_threshold=external_data_threshold)
    logger.info("generator family %s: %d decoder layers, %d heads, vocabulary %d", family.name, ctx.dims.layers,
                ctx.dims.heads, ctx.dims.vocab)
    entries = [e for e in GRAPHS if e.applies(ctx)]
    validation = _build_graphs(ctx, entries, opset, validate, tol, optimize, reduced, quantize_retrieval)
    with step(logger, "writing tokenizers"):
        tokenizers = _write_tokenizers(ctx)
    index = _export_index(ckpt, out) if include_index else None
    return build_manifest(ctx, [ctx.spec(e) for e in entries], tokenizers, opset=opset, precision=reduced or "fp32",
                          optimized=optimize, validation=validation, index=index)


def build_context_encoder_artifact(source: str, out: Path, *, opset: int, validate: bool,
                                   tol: Tolerance) -> Manifest:
    """Write a DPR context encoder's graph and tokenizer into ``out``; return its manifest."""
    ctx = ExportContext(out=out, context_encoder=_load_context_encoder(source))
    entries = [e for e in GRAPHS if e.applies(ctx)]
    validation = _build_graphs(ctx, entries, opset, validate, tol, optimize=False, reduced=None)
    return build_manifest(ctx, [ctx.spec(e) for e in entries], _write_tokenizers(ctx), opset=opset, validation=validation)


def _build_graphs(ctx: ExportContext, entries: list[GraphEntry], opset: int, validate: bool, tol: Tolerance,
                  optimize: bool, reduced: str | None, quantize_retrieval: bool = False) -> dict:
    """Trace, fuse, validate, reduce precision; returns the validation figures."""
    torch.manual_seed(0)
    modules = {}
    for entry in entries:
        with step(logger, f"exporting {entry.spec.name}"):
            module = modules[entry.spec.name] = entry.module(ctx).eval()
            trace(module, ctx.spec(entry), entry.sample_inputs(ctx, module), ctx.out, opset,
                  ctx.external_data_threshold)
    if optimize:
        with step(logger, "optimizing graphs (onnxruntime transformer fusions)"):
            for entry in entries:
                settings = entry.optimizer(ctx)
                if settings:
                    fused = convert.optimize(ctx.path(entry.spec), *settings, threshold=ctx.external_data_threshold)
                    logger.info("  %s fused: %s", entry.spec.name, fused or "nothing")
    validation: dict = {}
    if validate:
        with step(logger, "validating graphs against PyTorch"):
            validation = _validate(ctx, entries, modules, tol)
    if reduced:
        conversion, message = convert.REDUCED_PRECISIONS[reduced]
        converted = [e for e in entries if not e.keep_fp32
                     and not (e.retrieval and reduced == "int8" and not quantize_retrieval)]
        kept = [e.spec.name for e in entries if e.retrieval and e not in converted]
        if kept:
            logger.info("keeping %s fp32 (int8 embeddings would change which passages are retrieved; "
                        "--quantize-retrieval to quantize them too)", " and ".join(kept))
        with step(logger, message):
            for entry in converted:
                conversion(ctx.path(entry.spec), ctx.external_data_threshold)
            validation[f"{reduced}_drift"] = _validate(ctx, converted, modules, MEASURE_ONLY)
    return validation


def _validate(ctx: ExportContext, entries: list[GraphEntry], modules: dict, tol: Tolerance) -> dict[str, dict]:
    figures = {}
    for entry in entries:
        name = entry.spec.name
        figures[name] = entry.validate(ctx, modules[name], tol)
        for output, f in figures[name].items():
            logger.info("  %s %s: %s", name, output, _describe_figures(f))
    return figures


def _describe_figures(figures: dict) -> str:
    """One line of validation figures: the difference against its tolerance, and the decisions."""
    text = (f"max|diff| {figures['max_abs_diff']:.2e} (tolerance {figures['tolerance']:.2e}, "
            f"max|ref| {figures['max_abs_ref']:.3g})")
    d = figures.get("decisions")
    if d:
        ties = f" ({d['near_tie_rows']} near-ties)" if d["near_tie_rows"] else ""
        text += (f"; top-{d['top_k']} tokens agree in {d['rows_agreeing']}/{d['rows']} rows{ties}, "
                 f"closest top-1/top-2 gap {d['min_top_gap']:.2e}")
    return text


def _load_context_encoder(source: str) -> ContextEncoderSource:
    from transformers import AutoTokenizer, DPRContextEncoder

    location = resolve(source, "DPR context encoder").location
    try:
        model = DPRContextEncoder.from_pretrained(location).eval()
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load DPR context encoder {source}: {str(e).splitlines()[0]}") from e
    return ContextEncoderSource(source, model, tokenizer)


def _write_tokenizers(ctx: ExportContext) -> dict[str, TokenizerFile]:
    (ctx.out / "tokenizers").mkdir(exist_ok=True)
    entries = {}

    def write(name: str, tok, file: str, config) -> None:
        tok.backend_tokenizer.save(str(ctx.out / file))
        entries[name] = tokenizer_entry(tok, file, getattr(config, "max_position_embeddings", None))

    ckpt = ctx.checkpoint
    if ckpt is not None:
        write(C.QUESTION_TOKENIZER, ckpt.question_tokenizer, C.QUESTION_TOKENIZER_FILE,
              ckpt.model.question_encoder.config)
        # The generator tokenizer's limit is its own model_max_length, not the position table's.
        write(C.GENERATOR_TOKENIZER, ckpt.generator_tokenizer, C.GENERATOR_TOKENIZER_FILE, None)
    if ctx.context_encoder is not None:
        write(C.CONTEXT_TOKENIZER, ctx.context_encoder.tokenizer, C.CONTEXT_TOKENIZER_FILE,
              ctx.context_encoder.model.config)
    return entries


def _export_index(ckpt: Checkpoint, out: Path):
    """The checkpoint's own knowledge base (``index_name="custom"``); a hub index (wiki_dpr) is not
    exported: the export's closing lines (:mod:`rag_export.summary`) say how to build one."""
    cfg = ckpt.model.config
    if cfg.index_name != "custom":
        return None
    from .knowledge import export_custom_index

    with step(logger, "exporting knowledge index"):
        return export_custom_index(cfg, ckpt.directory, out / C.INDEX_DIR).manifest_entry(C.INDEX_DIR)
