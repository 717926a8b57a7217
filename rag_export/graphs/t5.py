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
    """One decoder call: ``t`` new tokens per row after that row's ``positions`` cached ones, rows of any
    question mapped onto their passages' cross K/V (see :mod:`.attention`)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.decoder = generator.decoder
        self.lm_head = generator.lm_head
        cfg = generator.config
        self.heads, self.layers = cfg.num_heads, cfg.num_decoder_layers
        scaled = getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
        self.output_scale = cfg.d_model**-0.5 if scaled else None
        self.relative = self.decoder.block[0].layer[0].SelfAttention

    def _bias(self, relative: torch.Tensor) -> torch.Tensor:
        """The learned bias of key-minus-query distances [..., t, keys] -> [..., t, keys, H]."""
        rel = self.relative
        buckets = rel._relative_position_bucket(
            relative, bidirectional=False, num_buckets=rel.relative_attention_num_buckets,
            max_distance=rel.relative_attention_max_distance,
        )
        return rel.relative_attention_bias(buckets)

    def forward(self, decoder_input_ids, positions, beam_idx, cross_query_rows, decoder_slots, encoder_attention_mask,
                *layer_tensors):
        past_keys, past_values, cross_keys, cross_values = A.split_layers(layer_tensors, self.layers)
        dec = self.decoder
        h = dec.embed_tokens(decoder_input_ids)
        new_len = decoder_input_ids.shape[1]
        # Query i of row r sits at positions[r] + i; past key j at j; new key i' at positions[r] + i'.
        width = past_keys[0].shape[2]
        queries = positions[:, None] + torch.arange(new_len)[None, :]
        past_bias = self._bias(torch.arange(width)[None, None, :] - queries[:, :, None]).permute(0, 3, 1, 2)
        new_bias = self._bias(torch.arange(new_len)[None, :] - torch.arange(new_len)[:, None]).permute(2, 0, 1)[None]
        cache = A.SlotCache(past_keys, past_values, beam_idx, positions, self.heads, new_len, h.dtype, past_bias,
                            new_bias)
        enc_bias = A.mask_bias(encoder_attention_mask, h.dtype)
        for i, block in enumerate(dec.block):
            att_layer, cross_layer, ff_layer = block.layer[0], block.layer[1], block.layer[2]
            att = att_layer.SelfAttention
            n = att_layer.layer_norm(h)
            q = A.split_heads(att.q(n), self.heads)
            h = h + att.o(A.merge_heads(cache.attend(i, q, att.k(n), att.v(n), None)))
            cross = cross_layer.EncDecAttention
            q = A.split_heads(cross.q(cross_layer.layer_norm(h)), self.heads)
            h = h + cross.o(A.merge_heads(A.folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, None,
                                                                   cross_query_rows, decoder_slots)))
            h = h + ff_layer.DenseReluDense(ff_layer.layer_norm(h))
        h = dec.final_layer_norm(h)
        if self.output_scale is not None:
            h = h * self.output_scale
        return (self.lm_head(h), *cache.outputs())


FAMILY = GeneratorFamily(
    name="t5",
    model_types=("t5",),
    dims=_dims,
    cross_projections=_cross_projections,
    decoder_graph=T5DecoderGraph,
    optimizer_type="t5",
)
