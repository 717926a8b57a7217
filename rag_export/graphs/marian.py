"""The Marian generator family: BART's post-LayerNorm layers with sinusoidal positions (no offset), no
LayerNorm on the embeddings and none after the last layer; the decoder applies ``embed_scale`` itself."""

from __future__ import annotations

from ..errors import ExportError
from .bart import BartLayout, bart_like_family


def _check_config(config) -> None:
    decoder_vocab = getattr(config, "decoder_vocab_size", None) or config.vocab_size
    if decoder_vocab != config.vocab_size:
        # RAG reads answers and builds passage inputs with one generator tokenizer, and the export records
        # one vocabulary size for the encoder inputs and the decoder logits.
        raise ExportError(
            f"Marian generator with a separate target vocabulary (decoder_vocab_size {decoder_vocab} != "
            f"vocab_size {config.vocab_size}) is not supported; supported are: decoder_vocab_size == vocab_size"
        )


FAMILY = bart_like_family("marian", BartLayout(pre_norm=False, embedding_norm=False, final_norm=False,
                                               position_offset=0, decoder_scales_embeddings=True),
                          check_config=_check_config)
