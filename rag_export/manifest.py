"""``build_manifest()``: the typed manifest of a finished export, from what the exporter wrote."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rag_runtime import constants as C
from rag_runtime.artifact import (
    GenerationDefaults,
    GraphFile,
    IndexRef,
    Manifest,
    RagSettings,
    TokenizerFile,
)
from rag_runtime.files import sha256_file

from .checkpoint import config_summary
from .convert import io_dtypes
from .graphs import GraphSpec
from .graphs.registry import ExportContext


def tokenizer_entry(tok, file: str, max_positions: int | None = None) -> TokenizerFile:
    """A fast tokenizer's manifest entry: the settings that change what its ``tokenizer.json`` does."""
    model_type = type(tok.backend_tokenizer.model).__name__
    cleanup = bool(tok.clean_up_tokenization_spaces) and not (
        model_type == "BPE"
        and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
    return TokenizerFile(file=file, clean_up_tokenization_spaces=cleanup, pad_token_id=tok.pad_token_id,
                         model_max_length=min(int(tok.model_max_length), max_positions or 1_000_000),
                         model=model_type)


def _graph_files(out: Path, specs: list[GraphSpec]) -> dict[str, GraphFile]:
    # IO dtypes as the files declare them: a precision conversion changes some.
    return {s.name: s.to_manifest(sha256_file(out / s.file), io_dtypes(out / s.file)) for s in specs}


def _file_digests(out: Path) -> dict[str, str]:
    # The index checks itself (index.json records file sizes): hashing gigabytes of embeddings at every
    # load would make start-up scale with the corpus.
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != C.INDEX_DIR)
    return {str(p.relative_to(out)): sha256_file(p) for p in files}


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__}


def build_manifest(ctx: ExportContext, specs: list[GraphSpec], tokenizers: dict[str, TokenizerFile], *,
                   opset: int, precision: str = "fp32", optimized: bool = False,
                   validation: dict | None = None, index: IndexRef | None = None) -> Manifest:
    """The manifest of the export in ``ctx.out``: call it last, once every file is written."""
    graphs = _graph_files(ctx.out, specs)
    common = dict(format_version=C.FORMAT_VERSION, graphs=graphs, tokenizers=tokenizers, opset=opset,
                  versions=_versions(), validation=validation or {}, files=_file_digests(ctx.out),
                  context_encoder_source=ctx.context_encoder.source if ctx.context_encoder else None)
    ckpt = ctx.checkpoint
    if ckpt is None:  # a context encoder alone, for rag-index build
        return Manifest(source=ctx.context_encoder.source, **common)
    cfg = ckpt.model.config
    q_cfg = ckpt.model.question_encoder.config
    rag = RagSettings(**config_summary(cfg), prefix=getattr(cfg.generator, "prefix", None),
                      rescoring_bos_token_id=cfg.bos_token_id or getattr(cfg.generator, "bos_token_id", None),
                      generator_pad_token_id=cfg.generator.pad_token_id)
    kv_dtype = graphs[C.GENERATOR_DECODER].dtype(C.per_layer(ctx.dims.layers, C.PRESENT_KEYS)[0])
    return Manifest(
        source=ckpt.source, kind=ckpt.kind, generator_type=ctx.family.name, precision=precision,
        optimized=optimized, decoder=dataclasses.replace(ctx.dims, kv_dtype=kv_dtype),
        question_embedding_dim=int(getattr(q_cfg, "projection_dim", 0) or q_cfg.hidden_size),
        rag=rag, generation_defaults=GenerationDefaults(**ckpt.generation_defaults), index=index, **common,
    )
