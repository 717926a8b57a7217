"""The configs of a factory checkpoint: DPR encoders, the generator, its generation defaults, the RAG config."""

from __future__ import annotations

from pathlib import Path

from .families import generator_spec


def _dpr(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn)


def _bart(d_model: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)


def _t5(d_model: int, d_kv: int, d_ff: int, layers: int, heads: int) -> dict:
    return dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers, num_heads=heads)


# Question encoder dims, generator dims per layout, and the vocab sizes the trained tokenizers are padded to.
SIZES = {
    "tiny": {"dpr": _dpr(64, 2, 4, 128), "bart": _bart(64, 2, 4, 128), "t5": _t5(64, 16, 128, 2, 4),
             "q_vocab": 1200, "g_vocab": 1500},
    "base": {"dpr": _dpr(768, 12, 12, 3072), "bart": _bart(768, 6, 12, 3072), "t5": _t5(768, 64, 2048, 12, 12),
             "q_vocab": 30522, "g_vocab": 50265},
    # rag-token-nq's dimensions: a BART-large generator beside a DPR-base question encoder.
    "large": {"dpr": _dpr(768, 12, 12, 3072), "bart": _bart(1024, 12, 16, 4096), "t5": _t5(1024, 64, 2816, 24, 16),
              "q_vocab": 30522, "g_vocab": 50265},
}
# Every family: beam search as the real checkpoints configure it.
_BEAM = dict(num_beams=4, max_length=40, min_length=1, no_repeat_ngram_size=3, early_stopping=True)


def dpr_config(q_tok, size: str, overrides: dict | None = None):
    """The config of both DPR encoders (``overrides`` applied last)."""
    from transformers import DPRConfig

    return DPRConfig(vocab_size=len(q_tok), max_position_embeddings=512, projection_dim=0,
                     pad_token_id=q_tok.pad_token_id, **{**SIZES[size]["dpr"], **(overrides or {})})


def generator_config(generator: str, g_tok, size: str, overrides: dict | None = None):
    """The generator's config: the size's dimensions, the family's variant, then ``overrides``."""
    import transformers

    spec = generator_spec(generator)
    ids = dict(pad_token_id=g_tok.pad_token_id, eos_token_id=g_tok.eos_token_id)
    dims = SIZES[size][spec.layout]
    if spec.layout == "t5":
        fields = dict(vocab_size=len(g_tok), **ids, decoder_start_token_id=g_tok.pad_token_id,
                      tie_word_embeddings=False, dropout_rate=0.0, **spec.variant, **dims)
    else:
        fields = dict(vocab_size=len(g_tok), max_position_embeddings=1024, forced_eos_token_id=g_tok.eos_token_id,
                      **ids, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **dims,
                      decoder_start_token_id=g_tok.pad_token_id if spec.start_from_pad else g_tok.eos_token_id,
                      bos_token_id=None if spec.start_from_pad else g_tok.bos_token_id,
                      tie_word_embeddings=False, **spec.variant)
    fields.update(overrides or {})
    cfg = getattr(transformers, spec.config)(**fields)
    if spec.prefix is not None:
        cfg.prefix = spec.prefix
    if getattr(cfg, "bos_token_id", None) is None:
        # RagSequenceForGeneration.get_nll reads config.generator.bos_token_id, which some configs lack.
        cfg.bos_token_id = None
    return cfg


def generator_model(generator: str, cfg):
    """The family's model class over ``cfg`` (weights at transformers' init)."""
    import transformers

    return getattr(transformers, generator_spec(generator).model)(cfg)


def generation_defaults(generator: str, g_tok) -> dict:
    """The generation defaults a checkpoint of the family carries: beam search, and the BART-like families'
    length penalty and forced EOS (and BOS, where decoding starts from EOS)."""
    spec = generator_spec(generator)
    if spec.layout == "t5":
        return dict(_BEAM)
    defaults = dict(_BEAM, length_penalty=1.0, forced_eos_token_id=g_tok.eos_token_id)
    if not spec.start_from_pad:
        defaults["forced_bos_token_id"] = g_tok.bos_token_id
    return defaults


def generation_config(gen_cfg, defaults: dict):
    """A ``GenerationConfig`` with the generator's special ids and ``defaults``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=gen_cfg.decoder_start_token_id, pad_token_id=gen_cfg.pad_token_id,
        eos_token_id=gen_cfg.eos_token_id, bos_token_id=getattr(gen_cfg, "bos_token_id", None), **defaults,
    )


def rag_config(dpr_cfg, gen_cfg, n_docs: int, knowledge: Path | None):
    """The RAG config; ``knowledge``: a knowledge base directory (:func:`rag_testing.factory.knowledge.
    write_knowledge_base`), None for none (generation from supplied contexts only)."""
    from transformers import RagConfig

    if knowledge is None:
        return RagConfig.from_question_encoder_generator_configs(dpr_cfg, gen_cfg, n_docs=n_docs,
                                                                 max_combined_length=300)
    return RagConfig.from_question_encoder_generator_configs(
        dpr_cfg, gen_cfg, n_docs=n_docs, max_combined_length=300, retrieval_vector_size=dpr_cfg.hidden_size,
        index_name="custom", passages_path=str(knowledge / "passages"),
        index_path=str(knowledge / "passages.faiss"), use_dummy_dataset=False,
    )
