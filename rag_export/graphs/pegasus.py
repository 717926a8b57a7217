"""The Pegasus generator family: pre-LayerNorm layers, a final decoder LayerNorm, sinusoidal positions
(no offset) and no LayerNorm on the embeddings; the decoder applies ``embed_scale`` itself."""

from __future__ import annotations

from .bart import BartLayout, bart_like_family

FAMILY = bart_like_family("pegasus", BartLayout(pre_norm=True, embedding_norm=False, final_norm=True,
                                                position_offset=0, decoder_scales_embeddings=True))
