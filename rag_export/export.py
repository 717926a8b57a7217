"""``export()``: checkpoint in, validated artifact directory out (written atomically)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from rag_runtime import constants as C
from rag_runtime.artifacts import replace_dir, sha256_file

from .checkpoint import Checkpoint, config_summary, load_checkpoint
from .errors import ExportError
from .graphs import GraphSpec
from .graphs.generator import (
    DECODER_SPEC,
    ENCODER_SPEC,
    GeneratorEncoderGraph,
    decoder_dims,
    decoder_graph,
    generator_type,
)
from .graphs.heads import RAG_TOKEN_HEAD_SPEC, RagTokenHead
from .graphs.heads import export_args as head_export_args
from .graphs.question_encoder import CONTEXT_ENCODER_SPEC, QUESTION_ENCODER_SPEC, DprEncoderGraph

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3
PRECISIONS = ("fp32", "fp16")
# Kept in fp32 in fp16 graphs: normalization statistics, softmax and everything exponential/logarithmic.
FP32_OPS = ["LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Exp",
            "Log", "ReduceLogSumExp"]
# IO kept in fp32 in fp16 graphs (the KV cache, in and out, travels in fp16).
FP32_IO = [C.QUESTION_EMBEDDING, C.PASSAGE_EMBEDDING, C.ENCODER_HIDDEN_STATES, C.LOGITS]


def _progress(msg: str) -> None:
    print(f"rag-export: {msg}", file=sys.stderr, flush=True)


@contextmanager
def _step(msg: str):
    _progress(f"{msg} ...")
    t0 = time.perf_counter()
    yield
    _progress(f"{msg}: done in {time.perf_counter() - t0:.1f}s")


def _export_graph(module: torch.nn.Module, spec: GraphSpec, args: tuple, out_dir: Path, opset: int) -> Path:
    path = out_dir / spec.file
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    return path


def _check_output_dir(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output {output_dir} exists and is not a directory")
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise ExportError(f"output directory {output_dir} is not empty; pass --force to replace it")


def _tokenizer_info(tok, max_positions: int | None = None) -> dict:
    model_type = type(tok.backend_tokenizer.model).__name__
    cleanup = bool(tok.clean_up_tokenization_spaces) and not (
        model_type == "BPE"
        and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
    return {"clean_up_tokenization_spaces": cleanup, "pad_token_id": tok.pad_token_id,
            "model_max_length": min(int(tok.model_max_length), max_positions or 1_000_000), "model": model_type}


def _sample(vocab: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, max(6, min(vocab, 30000)), (rows, length))
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    return ids, mask


def export(
    model: str | Checkpoint,
    output_dir: str | Path,
    *,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    atol: float = DEFAULT_ATOL,
    context_encoder: str | None = None,
    include_index: bool = True,
    quantize: str | None = None,
    precision: str = "fp32",
    optimize: bool = False,
) -> Path:
    """Export a RAG checkpoint into an artifact directory for ``rag_runtime``.

    Args:
        model: Hub id, local checkpoint directory, or an already loaded ``Checkpoint``.
        output_dir: Where to write; must be empty or absent unless ``force``.
        force: Replace a non-empty ``output_dir`` (only once the new export has succeeded).
        opset: ONNX opset.
        validate: Compare every graph in onnxruntime against PyTorch.
        atol: Largest accepted absolute difference during validation.
        context_encoder: Also export this DPR context encoder (hub id or directory).
        include_index: Export the checkpoint's custom knowledge base.
        quantize: ``"int8"``: dynamic int8 quantization of the graphs' weights (CPU). The fp32 graphs are
            validated first; the int8 drift against PyTorch is measured and recorded, not enforced.
        precision: ``"fp32"`` or ``"fp16"`` (for GPUs): fp16 weights and arithmetic, with LayerNorm,
            softmax and normalization statistics kept in fp32, the KV cache exchanged in fp16, and logits,
            embeddings and the RAG-Token head (the marginalization) in fp32. The fp32 graphs are validated
            first; the fp16 drift against PyTorch fp32 is measured and recorded, not enforced.
        optimize: Run onnxruntime's transformer optimizer over the encoder and decoder graphs (residual
            add + LayerNorm and bias + GELU fusions) before validation, so what is validated is what ships.

    Returns:
        The output directory.

    Raises:
        ExportError: On any user-facing problem; nothing is left behind.
    """
    output_dir = Path(output_dir)
    if quantize not in (None, "int8"):
        raise ExportError(f"unsupported quantization {quantize!r}; supported are: int8")
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision {precision!r}; supported are: {', '.join(PRECISIONS)}")
    if quantize and precision != "fp32":
        raise ExportError("--quantize int8 works on fp32 graphs; drop --precision fp16 (or the quantization)")
    _check_output_dir(output_dir, force)
    if isinstance(model, Checkpoint):
        ckpt = model
    else:
        with _step(f"loading {model}"):
            ckpt = load_checkpoint(str(model))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        manifest = _export_into(ckpt, tmp, opset=opset, validate=validate, atol=atol,
                                context_encoder=context_encoder, include_index=include_index, quantize=quantize,
                                precision=precision, optimize=optimize)
        (tmp / C.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _progress(f"wrote {output_dir}")
    return output_dir


def _export_into(ckpt: Checkpoint, out: Path, *, opset: int, validate: bool, atol: float,
                 context_encoder: str | None, include_index: bool, quantize: str | None = None,
                 precision: str = "fp32", optimize: bool = False) -> dict:
    import onnx
    import transformers

    from . import validate as V

    model = ckpt.model
    generator = model.generator
    gen_type = generator_type(generator)
    dims = decoder_dims(generator)
    q_vocab = model.question_encoder.config.vocab_size
    torch.manual_seed(0)
    graphs: dict[str, GraphSpec] = {}
    validation: dict[str, dict[str, float]] = {}

    with _step("exporting question_encoder"):
        q_graph = DprEncoderGraph(model.question_encoder).eval()
        q_path = _export_graph(q_graph, QUESTION_ENCODER_SPEC, _sample(q_vocab, 2, 8), out, opset)
        graphs["question_encoder"] = QUESTION_ENCODER_SPEC

    with _step(f"exporting generator_encoder ({gen_type})"):
        enc_graph = GeneratorEncoderGraph(generator).eval()
        ids, mask = _sample(dims["vocab"], 2, 9)
        enc_path = _export_graph(enc_graph, ENCODER_SPEC, (ids, mask), out, opset)
        graphs["generator_encoder"] = ENCODER_SPEC

    with _step(f"exporting generator_decoder ({gen_type}, {dims['layers']} layers, KV cache)"):
        dec = decoder_graph(generator).eval()
        with torch.no_grad():
            _, ck, cv = enc_graph(ids, mask)
        past = torch.zeros(dims["layers"], 4, dims["heads"], 3, dims["head_dim"])
        dec_ids = torch.randint(5, 50, (4, 1))
        beam_idx = torch.tensor([1, 0, 3, 2])
        dec_path = _export_graph(dec, DECODER_SPEC, (dec_ids, past, past, beam_idx, ck, cv, mask), out, opset)
        graphs["generator_decoder"] = DECODER_SPEC

    head_path = None
    if ckpt.kind == "token":
        with _step("exporting rag_token_head (marginalization + beam candidates)"):
            head_path = _export_graph(RagTokenHead().eval(), RAG_TOKEN_HEAD_SPEC, head_export_args(dims["vocab"]),
                                      out, opset)
            graphs["rag_token_head"] = RAG_TOKEN_HEAD_SPEC

    ctx_meta = None
    if context_encoder:
        with _step(f"exporting context_encoder from {context_encoder}"):
            ctx_meta = _export_context_encoder(context_encoder, out, opset, validate, atol, validation)
            graphs["context_encoder"] = CONTEXT_ENCODER_SPEC

    if optimize:
        with _step("optimizing graphs (onnxruntime transformer fusions)"):
            fused = {name: _optimize(out / spec.file, OPTIMIZER_TYPES[name][gen_type], dims, model)
                     for name, spec in graphs.items() if name in OPTIMIZER_TYPES}
            _progress("  fused: " + "; ".join(f"{name} {ops or 'nothing'}" for name, ops in fused.items()))

    if validate:
        with _step("validating graphs against PyTorch"):
            validation["question_encoder"] = V.validate_encoder(
                "question_encoder", q_path, q_graph, [C.QUESTION_EMBEDDING], q_vocab, atol)
            validation["generator"] = V.validate_generator(
                enc_path, dec_path, generator, dims, ckpt.generation_defaults["decoder_start_token_id"], atol)
            if head_path is not None:
                validation["rag_token_head"] = V.validate_rag_token_head(head_path, dims["vocab"], atol)
            for name, diffs in validation.items():
                _progress(f"  {name}: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))

    reduced = {"int8": (_quantize_int8, "quantizing graphs to int8 (dynamic, weights per channel)"),
               "fp16": (_convert_fp16, "converting graphs to fp16 (LayerNorm, softmax, logits in fp32)")}
    mode = quantize or (precision if precision != "fp32" else None)
    if mode:
        convert, message = reduced[mode]
        with _step(message):
            for name, spec in graphs.items():
                if name != "rag_token_head":  # the marginalization stays fp32; it has no weights
                    convert(out / spec.file)
            inf = float("inf")
            validation[f"{mode}_drift"] = {
                **V.validate_encoder("question_encoder", q_path, q_graph, [C.QUESTION_EMBEDDING], q_vocab, inf),
                **V.validate_generator(enc_path, dec_path, generator, dims,
                                       ckpt.generation_defaults["decoder_start_token_id"], inf),
            }
            _progress(f"  {mode} drift vs PyTorch fp32: " + ", ".join(
                f"{k} max|diff| {v:.2e}" for k, v in validation[f"{mode}_drift"].items()))

    with _step("writing tokenizers"):
        (out / "tokenizers").mkdir(exist_ok=True)
        ckpt.question_tokenizer.backend_tokenizer.save(str(out / C.QUESTION_TOKENIZER_FILE))
        ckpt.generator_tokenizer.backend_tokenizer.save(str(out / C.GENERATOR_TOKENIZER_FILE))

    index_meta = None
    cfg = model.config
    if include_index and cfg.index_name == "custom":
        from .knowledge import export_custom_index

        with _step("exporting knowledge index"):
            index_meta = export_custom_index(cfg, ckpt.source, out / C.INDEX_DIR)
    elif include_index:
        _progress(
            f"knowledge index {cfg.dataset!r} ({cfg.index_name}) is not exported: it is the hub's multi-GB "
            "wiki_dpr index. Build or import one and attach it later: rag-index attach OUT INDEX_DIR"
        )

    # The index checks itself (index.json records file sizes): hashing gigabytes of embeddings at every
    # load would make start-up scale with the corpus.
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != C.INDEX_DIR)
    gen_tok, q_tok = ckpt.generator_tokenizer, ckpt.question_tokenizer
    io_dtypes = {name: _io_dtypes(out / spec.file) for name, spec in graphs.items()}  # as the files declare
    bos_for_rescoring = cfg.bos_token_id or getattr(cfg.generator, "bos_token_id", None)
    return {
        "format_version": C.FORMAT_VERSION,
        "source": ckpt.source,
        "context_encoder_source": context_encoder,
        "kind": ckpt.kind,
        "generator_type": gen_type,
        "precision": quantize or precision,
        "optimized": optimize,
        "opset": opset,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                     "onnx": onnx.__version__},
        "graphs": {name: spec.to_manifest(sha256_file(out / spec.file), io_dtypes[name])
                   for name, spec in graphs.items()},
        "decoder": {**dims, "kv_dtype": io_dtypes["generator_decoder"][C.PRESENT_KEYS]},
        "question_embedding_dim": int(model.question_encoder.config.hidden_size
                                      if not getattr(model.question_encoder.config, "projection_dim", 0)
                                      else model.question_encoder.config.projection_dim),
        "tokenizers": {
            "question_encoder": {"file": C.QUESTION_TOKENIZER_FILE, **_tokenizer_info(
                q_tok, getattr(model.question_encoder.config, "max_position_embeddings", None))},
            "generator": {"file": C.GENERATOR_TOKENIZER_FILE, **_tokenizer_info(gen_tok)},
            **({"context_encoder": ctx_meta} if ctx_meta else {}),
        },
        "rag": {
            **config_summary(cfg),
            "prefix": getattr(cfg.generator, "prefix", None),
            "rescoring_bos_token_id": bos_for_rescoring,
            "generator_pad_token_id": cfg.generator.pad_token_id,
        },
        "generation_defaults": ckpt.generation_defaults,
        "index": index_meta.manifest_entry(C.INDEX_DIR) if index_meta else None,
        "validation": validation,
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files},
    }


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns on the root logger about optional pre-processing
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    tmp.replace(path)


# onnxruntime optimizer model type per graph and generator type.
OPTIMIZER_TYPES = {"question_encoder": {"bart": "bert", "t5": "bert"},
                   "generator_encoder": {"bart": "bart", "t5": "t5"},
                   "generator_decoder": {"bart": "bart", "t5": "t5"}}


def _optimize(path: Path, model_type: str, dims: dict, model) -> str:
    """Fuse in place; returns the fused operators and their counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    if model_type == "bert":
        cfg = model.question_encoder.config
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    else:
        heads, hidden = dims["heads"], dims["d_model"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimizer logs every pattern it does not find
    try:
        optimized = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                   opt_level=0)
    finally:
        root.setLevel(level)
    optimized.save_model_to_file(str(path))
    return ", ".join(f"{op} x{n}" for op, n in optimized.get_fused_operator_statistics().items() if n)


def _convert_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    keep = [v.name for v in (*model.graph.input, *model.graph.output) if v.name in FP32_IO]
    model = convert_float_to_float16(model, keep_io_types=keep, op_block_list=FP32_OPS)
    tmp = path.with_suffix(".fp16.onnx")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def _io_dtypes(path: Path) -> dict[str, str]:
    """Element type name of every graph input and output, as the file declares it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            for v in (*model.graph.input, *model.graph.output)}


def _export_context_encoder(source: str, out: Path, opset: int, validate: bool, atol: float,
                            validation: dict) -> dict:
    from transformers import AutoTokenizer, DPRContextEncoder

    from . import validate as V

    try:
        encoder = DPRContextEncoder.from_pretrained(source).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load DPR context encoder {source}: {str(e).splitlines()[0]}") from e
    graph = DprEncoderGraph(encoder).eval()
    path = _export_graph(graph, CONTEXT_ENCODER_SPEC, _sample(encoder.config.vocab_size, 2, 8), out, opset)
    if validate:
        validation["context_encoder"] = V.validate_encoder(
            "context_encoder", path, graph, [C.PASSAGE_EMBEDDING], encoder.config.vocab_size, atol)
    (out / "tokenizers").mkdir(exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out / C.CONTEXT_TOKENIZER_FILE))
    return {"file": C.CONTEXT_TOKENIZER_FILE,
            **_tokenizer_info(tokenizer, getattr(encoder.config, "max_position_embeddings", None))}


def export_context_encoder(source: str, output_dir: str | Path, *, opset: int = DEFAULT_OPSET,
                           validate: bool = True, atol: float = DEFAULT_ATOL) -> Path:
    """Export only a DPR context encoder (for ``rag-index build``): ``context_encoder.onnx``, its
    tokenizer and a manifest listing them. ``output_dir`` must not exist yet."""
    out = Path(output_dir)
    out.mkdir(parents=True)
    validation: dict = {}
    with _step(f"exporting context_encoder from {source}"):
        tok_meta = _export_context_encoder(source, out, opset, validate, atol, validation)
    manifest = {
        "format_version": C.FORMAT_VERSION,
        "source": source,
        "context_encoder_source": source,
        "opset": opset,
        "versions": {"torch": torch.__version__.split("+")[0]},
        "graphs": {"context_encoder": CONTEXT_ENCODER_SPEC.to_manifest(sha256_file(out / C.CONTEXT_ENCODER_FILE))},
        "tokenizers": {"context_encoder": tok_meta},
        "validation": validation,
    }
    (out / C.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out
