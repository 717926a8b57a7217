"""A whole factory checkpoint: tokenizers, configs, scaled random weights, the knowledge base, saved as a
hub checkpoint is."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..corpus import CORPUS, load_corpus
from . import configs
from .families import generator_spec
from .knowledge import embed_knowledge
from .tokenizers import train_tokenizers
from .weights import draw_logits_bias, scale_weights


def _log(msg: str) -> None:
    print(f"[factory] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(out: Path, kind: str = "token", generator: str = "bart", *, size: str = "tiny",
                    corpus: Path = CORPUS, seed: int = 0, n_passages: int = 0, n_docs: int = 5,
                    index_type: str | None = "Flat", generator_config: dict | None = None,
                    dpr_config: dict | None = None, logits_bias_std: float = 0.0) -> Path:
    """Write a RAG checkpoint to ``out`` and return ``out``.

    Args:
        out: The checkpoint directory (created if needed).
        kind: ``"token"`` (``RagTokenForGeneration``) or ``"sequence"``.
        generator: A generator family (:func:`rag_testing.factory.families.generators`).
        size: A key of :data:`rag_testing.factory.configs.SIZES`.
        corpus: JSONL passages (title, text): the tokenizers' training text and the knowledge base.
        seed: Seeds torch and every weight draw.
        n_passages: Minimum passage count (longer ones are joined, :func:`rag_testing.corpus.load_corpus`).
        n_docs: The RAG config's ``n_docs``.
        index_type: faiss factory string of the knowledge base; None for none (needs neither faiss nor
            datasets).
        generator_config: Fields of the generator's config, applied last.
        dpr_config: Fields of both DPR encoders' configs, applied last.
        logits_bias_std: Draw a random ``final_logits_bias`` with this std (BART-like generators).
    """
    import torch
    from transformers import (
        DPRContextEncoder,
        DPRQuestionEncoder,
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    torch.manual_seed(seed)
    spec = configs.SIZES[size]
    passages = load_corpus(corpus, min_passages=n_passages)
    texts = [f"{p['title']} {p['text']}" for p in passages]
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    q_tok, g_tok = train_tokenizers(texts, generator, spec["q_vocab"], spec["g_vocab"])
    _log(f"tokenizers trained ({len(q_tok)} / {len(g_tok)} tokens) in {time.perf_counter() - t0:.1f}s")

    dpr_cfg = configs.dpr_config(q_tok, size, dpr_config)
    gen_cfg = configs.generator_config(generator, g_tok, size, generator_config)
    gen_model = configs.generator_model(generator, gen_cfg)
    defaults = configs.generation_defaults(generator, g_tok)
    q_model = DPRQuestionEncoder(dpr_cfg)
    ctx_model = DPRContextEncoder(dpr_cfg)
    scale_weights(q_model, seed + 1)
    scale_weights(ctx_model, seed + 2)
    scale_weights(gen_model, seed + 3, embed_std=generator_spec(generator).embed_std)
    if logits_bias_std:
        draw_logits_bias(gen_model, seed + 4, logits_bias_std)
    gen_model.generation_config = configs.generation_config(gen_cfg, defaults)

    # Knowledge base: passages embedded by the (random) DPR context encoder, exactly as a real one would be.
    knowledge = embed_knowledge(out, passages, ctx_model, q_tok, index_type) if index_type else None
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    model = cls(config=configs.rag_config(dpr_cfg, gen_cfg, n_docs, knowledge), question_encoder=q_model,
                generator=gen_model)
    if kind == "token":
        model.generation_config = configs.generation_config(gen_cfg, defaults)
    save_checkpoint(out, model, q_tok, g_tok, ctx_model)
    _log(f"wrote rag-{kind} ({generator}, {size}) to {out}")
    return out


def save_checkpoint(out: Path, model, q_tok, g_tok, ctx_model) -> None:
    """The RAG model and its tokenizers as ``from_pretrained`` reads them; the context encoder (with the
    question tokenizer, which DPR's context encoder shares) under ``out/context_encoder``."""
    from transformers import RagTokenizer

    model.save_pretrained(out)
    RagTokenizer(question_encoder=q_tok, generator=g_tok).save_pretrained(out)
    ctx_model.save_pretrained(out / "context_encoder")
    q_tok.save_pretrained(out / "context_encoder")
