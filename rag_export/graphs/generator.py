"""The generator (BART or T5) split into an encoder graph and a one-step decoder graph.

``generator_encoder``: context ids/mask -> encoder states and every decoder layer's cross-attention
K/V, computed once per query. ``generator_decoder``: ``t`` new tokens with self-attention past K/V in
and present K/V out (``t`` = 1 per decode step; ``t`` = the whole answer for teacher-forced rescoring);
the first step passes a zero-length past, so one graph serves every step with no If node. ``beam_idx``
reorders the past rows first (row ``i`` continues from past row ``beam_idx[i]``), so beam search
reorders the cache where it lives, inside the decoder call, instead of gathering it on the host.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rag_runtime import constants as C

from . import GraphSpec
from .attention import (
    causal_bias,
    folded_cross_attention,
    mask_bias,
    merge_heads,
    self_attention,
    split_heads,
)

SUPPORTED_GENERATORS = ("bart", "t5")

KV = ["layers", "rows", "heads", "past", "head_dim"]

ENCODER_SPEC = GraphSpec(
    name="generator_encoder",
    file=C.GENERATOR_ENCODER_FILE,
    inputs={C.INPUT_IDS: ["enc_rows", "src_len"], C.ATTENTION_MASK: ["enc_rows", "src_len"]},
    outputs={
        C.ENCODER_HIDDEN_STATES: ["enc_rows", "src_len", "d_model"],
        C.CROSS_KEYS: ["layers", "enc_rows", "heads", "src_len", "head_dim"],
        C.CROSS_VALUES: ["layers", "enc_rows", "heads", "src_len", "head_dim"],
    },
    dtypes={C.INPUT_IDS: "int64", C.ATTENTION_MASK: "int64"},
)

DECODER_SPEC = GraphSpec(
    name="generator_decoder",
    file=C.GENERATOR_DECODER_FILE,
    inputs={
        C.DECODER_INPUT_IDS: ["rows", "new_len"],
        C.PAST_KEYS: ["layers", "rows", "heads", "past_len", "head_dim"],
        C.PAST_VALUES: ["layers", "rows", "heads", "past_len", "head_dim"],
        C.BEAM_IDX: ["rows"],
        C.CROSS_KEYS: ["layers", "enc_rows", "heads", "src_len", "head_dim"],
        C.CROSS_VALUES: ["layers", "enc_rows", "heads", "src_len", "head_dim"],
        C.ENCODER_ATTENTION_MASK: ["enc_rows", "src_len"],
    },
    outputs={
        C.LOGITS: ["rows", "new_len", "vocab"],
        C.PRESENT_KEYS: ["layers", "rows", "heads", "total_len", "head_dim"],
        C.PRESENT_VALUES: ["layers", "rows", "heads", "total_len", "head_dim"],
    },
    dtypes={C.DECODER_INPUT_IDS: "int64", C.BEAM_IDX: "int64", C.ENCODER_ATTENTION_MASK: "int64"},
)


def generator_type(generator: nn.Module) -> str:
    model_type = generator.config.model_type
    if model_type not in SUPPORTED_GENERATORS:
        raise ValueError(
            f"unsupported generator {model_type!r}; supported are: {', '.join(SUPPORTED_GENERATORS)}"
        )
    return model_type


def decoder_dims(generator: nn.Module) -> dict[str, int]:
    """Layer count, heads and head size of the decoder, as the runtime needs them for an empty past."""
    cfg = generator.config
    if generator_type(generator) == "bart":
        heads = cfg.decoder_attention_heads
        return {"layers": cfg.decoder_layers, "heads": heads, "head_dim": cfg.d_model // heads,
                "d_model": cfg.d_model, "vocab": cfg.vocab_size}
    return {"layers": cfg.num_decoder_layers, "heads": cfg.num_heads, "head_dim": cfg.d_kv,
            "d_model": cfg.d_model, "vocab": cfg.vocab_size}


def _cross_projections(generator: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    if generator_type(generator) == "bart":
        return [(la.encoder_attn.k_proj, la.encoder_attn.v_proj) for la in generator.model.decoder.layers]
    return [(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v) for b in generator.decoder.block]


class GeneratorEncoderGraph(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.encoder = generator.get_encoder()
        self.heads = decoder_dims(generator)["heads"]
        self.cross = nn.ModuleList(nn.ModuleList(kv) for kv in _cross_projections(generator))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]
        keys = torch.stack([split_heads(k(hidden), self.heads) for k, _ in self.cross])
        values = torch.stack([split_heads(v(hidden), self.heads) for _, v in self.cross])
        return hidden, keys, values


class BartDecoderGraph(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.decoder = generator.model.decoder
        self.lm_head = generator.lm_head
        self.register_buffer("final_logits_bias", generator.final_logits_bias.clone(), persistent=False)
        dims = decoder_dims(generator)
        self.heads = dims["heads"]
        self.scale = dims["head_dim"] ** -0.5
        self.position_offset = getattr(self.decoder.embed_positions, "offset", 2)

    def forward(self, decoder_input_ids, past_keys, past_values, beam_idx, cross_keys, cross_values,
                encoder_attention_mask):
        past_keys, past_values = past_keys.index_select(1, beam_idx), past_values.index_select(1, beam_idx)
        dec = self.decoder
        past_len = past_keys.shape[3]
        new_len = decoder_input_ids.shape[1]
        positions = torch.arange(new_len) + past_len + self.position_offset
        h = dec.embed_tokens(decoder_input_ids) + F.embedding(positions, dec.embed_positions.weight)
        h = dec.layernorm_embedding(h)
        self_bias = causal_bias(past_len, new_len, h.dtype)
        enc_bias = mask_bias(encoder_attention_mask, h.dtype)
        present_k, present_v = [], []
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            q = split_heads(att.q_proj(h), self.heads)
            k = torch.cat([past_keys[i], split_heads(att.k_proj(h), self.heads)], dim=2)
            v = torch.cat([past_values[i], split_heads(att.v_proj(h), self.heads)], dim=2)
            present_k.append(k)
            present_v.append(v)
            h = layer.self_attn_layer_norm(h + att.out_proj(merge_heads(self_attention(q, k, v, self_bias, self.scale))))
            cross = layer.encoder_attn
            q = split_heads(cross.q_proj(h), self.heads)
            x = folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, self.scale)
            h = layer.encoder_attn_layer_norm(h + cross.out_proj(merge_heads(x)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        if getattr(dec, "layer_norm", None) is not None:
            h = dec.layer_norm(h)
        logits = self.lm_head(h) + self.final_logits_bias
        return logits, torch.stack(present_k), torch.stack(present_v)


class T5DecoderGraph(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.decoder = generator.decoder
        self.lm_head = generator.lm_head
        cfg = generator.config
        self.heads = cfg.num_heads
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
        return bias + causal_bias(past_len, new_len, dtype)

    def forward(self, decoder_input_ids, past_keys, past_values, beam_idx, cross_keys, cross_values,
                encoder_attention_mask):
        past_keys, past_values = past_keys.index_select(1, beam_idx), past_values.index_select(1, beam_idx)
        dec = self.decoder
        past_len = past_keys.shape[3]
        new_len = decoder_input_ids.shape[1]
        h = dec.embed_tokens(decoder_input_ids)
        self_bias = self._position_bias(past_len, new_len, h.dtype)
        enc_bias = mask_bias(encoder_attention_mask, h.dtype)
        present_k, present_v = [], []
        for i, block in enumerate(dec.block):
            att_layer, cross_layer, ff_layer = block.layer[0], block.layer[1], block.layer[2]
            att = att_layer.SelfAttention
            n = att_layer.layer_norm(h)
            q = split_heads(att.q(n), self.heads)
            k = torch.cat([past_keys[i], split_heads(att.k(n), self.heads)], dim=2)
            v = torch.cat([past_values[i], split_heads(att.v(n), self.heads)], dim=2)
            present_k.append(k)
            present_v.append(v)
            h = h + att.o(merge_heads(self_attention(q, k, v, self_bias, None)))
            cross = cross_layer.EncDecAttention
            q = split_heads(cross.q(cross_layer.layer_norm(h)), self.heads)
            h = h + cross.o(merge_heads(folded_cross_attention(q, cross_keys[i], cross_values[i], enc_bias, None)))
            h = h + ff_layer.DenseReluDense(ff_layer.layer_norm(h))
        h = dec.final_layer_norm(h)
        if self.output_scale is not None:
            h = h * self.output_scale
        return self.lm_head(h), torch.stack(present_k), torch.stack(present_v)


def decoder_graph(generator: nn.Module) -> nn.Module:
    return BartDecoderGraph(generator) if generator_type(generator) == "bart" else T5DecoderGraph(generator)
