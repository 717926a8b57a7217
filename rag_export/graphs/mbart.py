"""The mBART generator family: BART with pre-LayerNorm layers and a final decoder LayerNorm."""

from __future__ import annotations

from .bart import BartLayout, bart_like_family

FAMILY = bart_like_family("mbart", BartLayout(pre_norm=True, embedding_norm=True, final_norm=True,
                                              position_offset=2, decoder_scales_embeddings=False))
