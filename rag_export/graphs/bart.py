"""The BART-like generator families: one decoder graph, parameterized by where the layers normalize, how
positions are embedded and where the embedding scale lives.

BART is post-LayerNorm with learned positions (offset 2) and a LayerNorm on the embeddings; mBART,
Marian and Pegasus (their own modules) are the same graph with other switches (:class:`BartLayout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rag_runtime.artifact import DecoderDims

from . import attention as A
from .families import GeneratorFamily


@dataclass(frozen=True)
class BartLayout:
    """How one BART-like decoder differs from BART's.

    Attributes:
        pre_norm: Each sub-layer normalizes its input (mBART, Pegasus) instead of its residual sum (BART,
            Marian).
        embedding_norm: A ``layernorm_embedding`` follows the embeddings (BART, mBART).
        final_norm: A ``layer_norm`` follows the last layer (mBART, Pegasus).
        position_offset: Added to positions before the lookup: 2 for BART's learned table, 0 for the
            sinusoidal tables of Marian and Pegasus.
        decoder_scales_embeddings: The decoder multiplies by ``embed_scale`` after a plain embedding
            lookup (Marian, Pegasus); otherwise the scaled word embedding module applies it itself.
    """

    pre_norm: bool
    embedding_norm: bool
    final_norm: bool
    position_offset: int
    decoder_scales_embeddings: bool


BART_LAYOUT = BartLayout(pre_norm=False, embedding_norm=True, final_norm=False, position_offset=2,
                         decoder_scales_embeddings=False)


def bart_dims(cfg) -> DecoderDims:
    """Decoder dimensions of a BART-like config."""
    heads = cfg.decoder_attention_heads
    return DecoderDims(layers=cfg.decoder_layers, heads=heads, head_dim=cfg.d_model // heads, d_model=cfg.d_model,
                       vocab=cfg.vocab_size, max_positions=cfg.max_position_embeddings)


def _cross_projections(generator: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(la.encoder_attn.k_proj, la.encoder_attn.v_proj) for la in generator.model.decoder.layers]


class BartDecoderGraph(nn.Module):
    """One decoder call: ``t`` new tokens per row after that row's ``positions`` cached ones, rows of any
    question mapped onto their passages' cross K/V (see :mod:`.attention`)."""

    def __init__(self, generator: nn.Module, layout: BartLayout = BART_LAYOUT):
        super().__init__()
        self.decoder = dec = generator.model.decoder
        self.lm_head = generator.lm_head
        self.layout = layout
        # Checked here so that a transformers release moving these pieces fails the export, not the parity.
        for name, wanted in (("layernorm_embedding", layout.embedding_norm), ("layer_norm", layout.final_norm)):
            if (getattr(dec, name, None) is not None) != wanted:
                raise TypeError(f"{type(dec).__name__}.{name} is {'missing' if wanted else 'unexpected'}")
        self.embed_scale = float(dec.embed_scale) if layout.decoder_scales_embeddings else None
        self.register_buffer("final_logits_bias", generator.final_logits_bias.clone(), persistent=False)
        dims = bart_dims(generator.config)
        self.heads, self.layers = dims.heads, dims.layers
        self.scale = dims.head_dim**-0.5

    def _embed(self, decoder_input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        h = dec.embed_tokens(decoder_input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        at = positions[:, None] + torch.arange(decoder_input_ids.shape[1])[None, :] + self.layout.position_offset
        h = h + F.embedding(at, dec.embed_positions.weight)
        return dec.layernorm_embedding(h) if self.layout.embedding_norm else h

    def _sublayer(self, h: torch.Tensor, norm: nn.Module, body: Callable[[torch.Tensor], torch.Tensor]):
        """Residual around ``body``, normalized before (pre-LN) or after (post-LN)."""
        if self.layout.pre_norm:
            return h + body(norm(h))
        return norm(h + body(h))

    def forward(self, decoder_input_ids, positions, beam_idx, cross_query_rows, decoder_slots, encoder_attention_mask,
                *layer_tensors):
        past_keys, past_values, cross_keys, cross_values = A.split_layers(layer_tensors, self.layers)
        h = self._embed(decoder_input_ids, positions)
        cache = A.SlotCache(past_keys, past_values, beam_idx, positions, self.heads, decoder_input_ids.shape[1], h.dtype)
        enc_bias = A.mask_bias(encoder_attention_mask, h.dtype)
        for i, layer in enumerate(self.decoder.layers):
            att, cross = layer.self_attn, layer.encoder_attn

            def self_attention(x, att=att, i=i):
                q = A.split_heads(att.q_proj(x), self.heads)
                return att.out_proj(A.merge_heads(cache.attend(i, q, att.k_proj(x), att.v_proj(x), self.scale)))

            def cross_attention(x, cross=cross, i=i):
                q = A.split_heads(cross.q_proj(x), self.heads)
                out = A.folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, self.scale,
                                               cross_query_rows, decoder_slots)
                return cross.out_proj(A.merge_heads(out))

            h = self._sublayer(h, layer.self_attn_layer_norm, self_attention)
            h = self._sublayer(h, layer.encoder_attn_layer_norm, cross_attention)
            h = self._sublayer(h, layer.final_layer_norm, lambda x, la=layer: la.fc2(la.activation_fn(la.fc1(x))))
        if self.layout.final_norm:
            h = self.decoder.layer_norm(h)
        return (self.lm_head(h) + self.final_logits_bias, *cache.outputs())


def bart_like_family(name: str, layout: BartLayout, check_config: Callable[[object], None] | None = None,
                     dims: Callable[[object], DecoderDims] = bart_dims) -> GeneratorFamily:
    """The registry entry of a BART-like family: ``model_type`` ``name``, decoded by :class:`BartDecoderGraph`.

    onnxruntime's optimizer has no model type for mBART, Marian or Pegasus; its BART fusions apply to all
    (they match LayerNorm and attention patterns, whichever side of the residual the norm sits on), and the
    optimized graphs are validated like the plain ones.
    """
    return GeneratorFamily(
        name=name,
        model_types=(name,),
        dims=dims,
        cross_projections=_cross_projections,
        decoder_graph=lambda generator: BartDecoderGraph(generator, layout),
        optimizer_type="bart",
        check_config=check_config or (lambda config: None),
    )


FAMILY = bart_like_family("bart", BART_LAYOUT)
