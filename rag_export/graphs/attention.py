"""Attention written out with explicit K/V layouts, shared by the BART and T5 graphs.

Layouts: keys/values are ``[rows, heads, length, head_dim]``. Cross-attention is *beam-folded*: the
decoder has ``rows = enc_rows * k`` rows ordered (passage, beam), and the ``k`` beams of one passage
become extra query positions against that passage's K/V, so encoder outputs are never copied per beam.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, len, heads*dim] -> [rows, heads, len, dim]"""
    rows, length, _ = x.shape
    return x.reshape(rows, length, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[rows, heads, len, dim] -> [rows, len, heads*dim]"""
    rows, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(rows, length, heads * dim)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, src] 0/1 mask -> additive bias [rows, 1, 1, src] (0 or the dtype's min, like transformers)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_bias(past_len: torch.Tensor, new_len: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[new, past+new] additive bias: query i (absolute position past+i) sees keys 0..past+i."""
    q_pos = torch.arange(new_len) + past_len
    k_pos = torch.arange(new_len + past_len)
    return (k_pos[None, :] > q_pos[:, None]).to(dtype) * torch.finfo(dtype).min


def _scores(q, k, scale: float | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))
    return scores if scale is None else scores * scale  # scaled after the product, as transformers does


def self_attention(q, k, v, bias, scale: float | None) -> torch.Tensor:
    """q [rows,H,t,d], k/v [rows,H,p+t,d], bias broadcastable to [rows,H,t,p+t]."""
    scores = _scores(q, k, scale) + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def folded_cross_attention(q, k, v, enc_bias, scale: float | None) -> torch.Tensor:
    """q [enc_rows*beams, H, t, d]; k/v [enc_rows, H, src, d]; enc_bias [enc_rows, 1, 1, src]."""
    rows, heads, t, dim = q.shape
    enc_rows = k.shape[0]
    beams = rows // enc_rows
    qf = q.reshape(enc_rows, beams, heads, t, dim).transpose(1, 2).reshape(enc_rows, heads, beams * t, dim)
    scores = _scores(qf, k, scale) + enc_bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(enc_rows, heads, beams, t, dim).transpose(1, 2).reshape(rows, heads, t, dim)


def split_layers(tensors: tuple[torch.Tensor, ...], layers: int) -> tuple[list[torch.Tensor], ...]:
    """The decoder graph's per-layer inputs, in the spec's order: past keys, past values, cross keys and
    cross values, one list of ``layers`` tensors each."""
    if len(tensors) != 4 * layers:
        raise TypeError(f"the decoder takes 4 x {layers} per-layer tensors, got {len(tensors)}")
    return tuple(list(tensors[i * layers : (i + 1) * layers]) for i in range(4))


class StepCache:
    """The self-attention cache of one decoder call: each layer's past rows reordered by ``beam_idx`` (row
    ``i`` continues past row ``beam_idx[i]``), its new keys and values appended to them."""

    def __init__(self, past_keys: list[torch.Tensor], past_values: list[torch.Tensor], beam_idx: torch.Tensor,
                 heads: int):
        self._past_k = [k.index_select(0, beam_idx) for k in past_keys]
        self._past_v = [v.index_select(0, beam_idx) for v in past_values]
        self.past_len = past_keys[0].shape[2]
        self._heads = heads
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def extend(self, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values for attention: its past followed by the new [rows, t, H*d] ones."""
        k = torch.cat([self._past_k[layer], split_heads(new_keys, self._heads)], dim=2)
        v = torch.cat([self._past_v[layer], split_heads(new_values, self._heads)], dim=2)
        self._keys.append(k)
        self._values.append(v)
        return k, v

    def present(self) -> tuple[torch.Tensor, ...]:
        """Every layer's keys, then every layer's values: the graph's ``present_keys.*``, ``present_values.*``."""
        return (*self._keys, *self._values)
