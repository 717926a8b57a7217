"""The T5 generator family: pre-RMSNorm, relative position buckets, optional gated FFN (T5 v1.1, mT5)."""

from __future__ import annotations

import torch
from torch import nn

from rag_runtime.artifact import DecoderDims

from . import attention as A
from .families import GeneratorFamily


def _dims(cfg) -> DecoderDims:
    return DecoderDims(layers=cfg.num_decoder_layers, heads=cfg.num_heads, head_dim=cfg.d_kv, d_model=cfg.d_model,
                       vocab=cfg.vocab_size)


def _cross_projections(generator: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v) for b in generator.decoder.block]


class T5DecoderGraph(nn.Module):
    """One decoder call: ``t`` new tokens after ``past_len`` cached ones, beams folded over cross K/V."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.decoder = generator.decoder
        self.lm_head = generator.lm_head
        cfg = generator.config
        self.heads, self.layers = cfg.num_heads, cfg.num_decoder_layers
        scaled = getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
        self.output_scale = cfg.d_model**-0.5 if scaled else None
        self.relative = self.decoder.block[0].layer[0].SelfAttention

    def _position_bias(self, past_len, new_len, dtype):
        rel = self.relative
        context = torch.arange(new_len)[:, None] + past_len
        memory = torch.arange(new_len + past_len)[None, :]
        buckets = rel._relative_position_bucket(
            memory - context, bidirectional=False, num_buckets=rel.relative_attention_num_buckets,
            max_distance=rel.relative_attention_max_distance,
        )
        bias = rel.relative_attention_bias(buckets).permute(2, 0, 1)[None]
        return bias + A.causal_bias(past_len, new_len, dtype)

    def forward(self, decoder_input_ids, beam_idx, encoder_attention_mask, *layer_tensors):
        past_keys, past_values, cross_keys, cross_values = A.split_layers(layer_tensors, self.layers)
        cache = A.StepCache(past_keys, past_values, beam_idx, self.heads)
        dec = self.decoder
        h = dec.embed_tokens(decoder_input_ids)
        self_bias = self._position_bias(cache.past_len, decoder_input_ids.shape[1], h.dtype)
        enc_bias = A.mask_bias(encoder_attention_mask, h.dtype)
        for i, block in enumerate(dec.block):
            att_layer, cross_layer, ff_layer = block.layer[0], block.layer[1], block.layer[2]
            att = att_layer.SelfAttention
            n = att_layer.layer_norm(h)
            q = A.split_heads(att.q(n), self.heads)
            k, v = cache.extend(i, att.k(n), att.v(n))
            h = h + att.o(A.merge_heads(A.self_attention(q, k, v, self_bias, None)))
            cross = cross_layer.EncDecAttention
            q = A.split_heads(cross.q(cross_layer.layer_norm(h)), self.heads)
            h = h + cross.o(A.merge_heads(A.folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, None)))
            h = h + ff_layer.DenseReluDense(ff_layer.layer_norm(h))
        h = dec.final_layer_norm(h)
        if self.output_scale is not None:
            h = h * self.output_scale
        return (self.lm_head(h), *cache.present())


FAMILY = GeneratorFamily(
    name="t5",
    model_types=("t5",),
    dims=_dims,
    cross_projections=_cross_projections,
    decoder_graph=T5DecoderGraph,
    optimizer_type="t5",
)
