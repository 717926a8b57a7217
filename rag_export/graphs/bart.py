"""The BART generator family: post-LayerNorm encoder-decoder with learned positions (offset 2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rag_runtime.artifact import DecoderDims

from . import attention as A
from .families import GeneratorFamily


def _dims(cfg) -> DecoderDims:
    heads = cfg.decoder_attention_heads
    return DecoderDims(layers=cfg.decoder_layers, heads=heads, head_dim=cfg.d_model // heads, d_model=cfg.d_model,
                       vocab=cfg.vocab_size)


def _cross_projections(generator: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(la.encoder_attn.k_proj, la.encoder_attn.v_proj) for la in generator.model.decoder.layers]


class BartDecoderGraph(nn.Module):
    """One decoder call: ``t`` new tokens after ``past_len`` cached ones, beams folded over cross K/V."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.decoder = generator.model.decoder
        self.lm_head = generator.lm_head
        self.register_buffer("final_logits_bias", generator.final_logits_bias.clone(), persistent=False)
        dims = _dims(generator.config)
        self.heads = dims.heads
        self.scale = dims.head_dim**-0.5
        self.position_offset = getattr(self.decoder.embed_positions, "offset", 2)

    def forward(self, decoder_input_ids, past_keys, past_values, beam_idx, cross_keys, cross_values,
                encoder_attention_mask):
        cache = A.StepCache(past_keys, past_values, beam_idx, self.heads)
        dec = self.decoder
        past_len, new_len = cache.past_len, decoder_input_ids.shape[1]
        positions = torch.arange(new_len) + past_len + self.position_offset
        h = dec.embed_tokens(decoder_input_ids) + F.embedding(positions, dec.embed_positions.weight)
        h = dec.layernorm_embedding(h)
        self_bias = A.causal_bias(past_len, new_len, h.dtype)
        enc_bias = A.mask_bias(encoder_attention_mask, h.dtype)
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            q = A.split_heads(att.q_proj(h), self.heads)
            k, v = cache.extend(i, att.k_proj(h), att.v_proj(h))
            h = layer.self_attn_layer_norm(h + att.out_proj(A.merge_heads(A.self_attention(q, k, v, self_bias, self.scale))))
            cross = layer.encoder_attn
            q = A.split_heads(cross.q_proj(h), self.heads)
            x = A.folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, self.scale)
            h = layer.encoder_attn_layer_norm(h + cross.out_proj(A.merge_heads(x)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        if getattr(dec, "layer_norm", None) is not None:
            h = dec.layer_norm(h)
        return (self.lm_head(h) + self.final_logits_bias, *cache.present())


BART = GeneratorFamily(
    name="bart",
    model_types=("bart",),
    dims=_dims,
    cross_projections=_cross_projections,
    decoder_graph=BartDecoderGraph,
    optimizer_type="bart",
)
