"""Load a RAG checkpoint (hub id or local directory) through transformers and describe it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError
from .hub import Resolved, cached_snapshot, resolve

logger = logging.getLogger(__name__)

RAG_ARCHITECTURES = {"RagTokenForGeneration": "token", "RagSequenceForGeneration": "sequence"}
SUPPORTED_QUESTION_ENCODERS = ("dpr",)


@dataclass
class Checkpoint:
    """A loaded RAG checkpoint.

    Attributes:
        source: The model id or path it was loaded from.
        directory: The local directory its files are in (a hub id's cached snapshot); empty if unknown.
        kind: ``"token"`` or ``"sequence"``.
        model: The ``RagTokenForGeneration`` / ``RagSequenceForGeneration`` in eval mode.
        question_tokenizer: Fast tokenizer of the question encoder.
        generator_tokenizer: Fast tokenizer of the generator.
        generation_defaults: Generation parameters the installed transformers uses when none are given.
    """

    source: str
    directory: str
    kind: str
    model: Any
    question_tokenizer: Any
    generator_tokenizer: Any
    generation_defaults: dict

    @property
    def config(self):
        return self.model.config


def read_config(source: str | Resolved) -> dict:
    """The ``config.json`` of a checkpoint directory or hub id (found as :func:`rag_export.hub.resolve` says)."""
    from transformers import PretrainedConfig

    where = source if isinstance(source, Resolved) else resolve(source)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(where.location)
    except (OSError, ValueError) as e:
        if where.origin == "directory":
            raise ExportError(f"{where.location} has no config.json: not a transformers checkpoint") from e
        raise ExportError(f"cannot read the config of {where.source} ({where.location}): "
                          f"{str(e).splitlines()[0]}") from e
    return config_dict


def detect_kind(config_dict: dict, source: str) -> str:
    archs = config_dict.get("architectures") or []
    kinds = [RAG_ARCHITECTURES[a] for a in archs if a in RAG_ARCHITECTURES]
    if config_dict.get("model_type") != "rag" or not kinds:
        found = ", ".join(archs) or config_dict.get("model_type") or "unknown"
        raise ExportError(
            f"{source} is not a RAG generation checkpoint (found {found}); need one with architecture "
            "RagTokenForGeneration or RagSequenceForGeneration, e.g. facebook/rag-token-nq"
        )
    q_type = (config_dict.get("question_encoder") or {}).get("model_type")
    if q_type not in SUPPORTED_QUESTION_ENCODERS:
        raise ExportError(
            f"unsupported question encoder {q_type!r}; supported are: {', '.join(SUPPORTED_QUESTION_ENCODERS)}"
        )
    _check_generator(config_dict.get("generator") or {})
    return kinds[0]


def _check_generator(generator_dict: dict) -> None:
    """Refuse an unsupported generator family or variant before any weights are loaded (a variant the graphs
    cannot reproduce may not even load, e.g. a vocabulary size its weights do not have)."""
    from .graphs.families import family_for, supported_model_types

    g_type = generator_dict.get("model_type")
    if g_type not in supported_model_types():
        raise ExportError(f"unsupported generator {g_type!r}; supported are: {', '.join(supported_model_types())}")
    from transformers import AutoConfig

    family_for(AutoConfig.for_model(**generator_dict))


_GENERATION_FIELDS = (
    "num_beams", "max_length", "min_length", "no_repeat_ngram_size", "length_penalty", "early_stopping",
    "forced_bos_token_id", "forced_eos_token_id", "repetition_penalty", "bad_words_ids",
    "num_return_sequences", "decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
    "max_new_tokens", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "do_sample", "temperature",
    "top_k", "top_p",
)


def _global_defaults() -> dict:
    """What the installed transformers' generate() uses for parameters neither the caller nor the model's
    generation config sets (``GenerationConfig._get_default_generation_params`` in 5.x)."""
    from transformers import GenerationConfig

    known = getattr(GenerationConfig, "_get_default_generation_params", None)
    defaults = known() if known is not None else {
        "num_beams": 1, "num_return_sequences": 1, "min_length": 0, "max_length": 20, "length_penalty": 1.0,
        "early_stopping": False, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "do_sample": False,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {k: v for k, v in defaults.items() if k in _GENERATION_FIELDS}


def resolve_generation_defaults(model, kind: str) -> dict:
    """The parameters ``generate()`` uses when the caller passes none, read off the loaded model.

    RAG-Token decodes with the RAG model's own generation config. RAG-Sequence hands each passage to the
    generator's ``generate`` (so its config rules) but sets ``num_beams`` and ``num_return_sequences``
    from the RAG config itself, defaulting to 1.
    """
    gc = model.generation_config if kind == "token" else model.generator.generation_config
    out = {f: getattr(gc, f, None) for f in _GENERATION_FIELDS}
    cfg, gen_cfg = model.config, model.config.generator
    if out["decoder_start_token_id"] is None:
        out["decoder_start_token_id"] = (
            cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else gen_cfg.decoder_start_token_id
        )
    if out["eos_token_id"] is None:
        out["eos_token_id"] = gen_cfg.eos_token_id
    if out["pad_token_id"] is None:
        out["pad_token_id"] = gen_cfg.pad_token_id
    if isinstance(out["eos_token_id"], int):
        out["eos_token_id"] = [out["eos_token_id"]]
    if out["pad_token_id"] is None and out["eos_token_id"]:
        out["pad_token_id"] = out["eos_token_id"][0]
    if kind == "sequence":
        if out["max_length"] is None:
            # generator.generate() treats an unset max_length as "20 new tokens": 20 + the decoder prompt
            # (the start token), capped at the generator's position limit.
            out["max_length"] = 21
            limit = getattr(gen_cfg, "max_position_embeddings", None)
            if limit is not None:
                out["max_length"] = min(out["max_length"], limit)
        out["num_beams"] = getattr(cfg, "num_beams", None) or 1
        out["num_return_sequences"] = getattr(cfg, "num_return_sequences", None) or 1
    for key, default in _global_defaults().items():
        if out[key] is None:
            out[key] = default
    return out


def load_checkpoint(source: str) -> Checkpoint:
    """Load ``source`` (hub id or directory) without its retriever; errors are ``ExportError``.

    A hub id loads from the hub when it answers, else from the Hugging Face cache (:mod:`rag_export.hub`).
    """
    source = str(source)
    where = resolve(source)
    config_dict = read_config(where)
    kind = detect_kind(config_dict, source)
    from transformers import RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    location = where.location
    if where.directory:
        for sub in ("question_encoder_tokenizer", "generator_tokenizer"):
            if not os.path.isdir(os.path.join(location, sub)):
                raise ExportError(f"{location} has no {sub}/ folder: the checkpoint's tokenizers are missing "
                                  "(save them with RagTokenizer.save_pretrained)")
    try:
        tokenizer = RagTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError) as e:
        raise ExportError(
            f"{source} has no usable tokenizers (expected question_encoder_tokenizer/ and generator_tokenizer/): {e}"
        ) from e
    try:
        model = cls.from_pretrained(location).eval()
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the weights of {source}: {str(e).splitlines()[0]}") from e
    for name, tok in (("question encoder", tokenizer.question_encoder), ("generator", tokenizer.generator)):
        if getattr(tok, "backend_tokenizer", None) is None:
            raise ExportError(f"the {name} tokenizer of {source} has no fast (tokenizer.json) version")
    return Checkpoint(
        source=source, directory=where.directory or str(cached_snapshot(source) or ""), kind=kind, model=model,
        question_tokenizer=tokenizer.question_encoder,
        generator_tokenizer=tokenizer.generator, generation_defaults=resolve_generation_defaults(model, kind),
    )


def resolve_local_path(path: str | None, checkpoint_dir: str) -> Path | None:
    """Paths in a RagConfig may be absolute or relative to the checkpoint directory."""
    if not path:
        return None
    p = Path(path)
    if p.exists():
        return p
    candidate = Path(checkpoint_dir) / path
    return candidate if candidate.exists() else p


def config_summary(config) -> dict:
    return json.loads(json.dumps({
        "n_docs": config.n_docs, "title_sep": config.title_sep, "doc_sep": config.doc_sep,
        "max_combined_length": config.max_combined_length, "do_deduplication": config.do_deduplication,
        "exclude_bos_score": config.exclude_bos_score, "label_smoothing": config.label_smoothing,
        "retrieval_vector_size": config.retrieval_vector_size, "index_name": config.index_name,
        "dataset": config.dataset,
    }))
