"""Attention written out with explicit K/V layouts, shared by the BART and T5 graphs.

Layouts: keys/values are ``[rows, heads, length, head_dim]``. Cross-attention is *beam-folded*: the decoder
rows that read one encoder row (a passage's beams, of one question or another) become extra query positions
against that passage's K/V, so encoder outputs are never copied per beam. Rows map onto encoder rows through
``cross_query_rows`` [enc_rows, fold] (the decoder row in each of an encoder row's ``fold`` query slots; an
empty slot names any row, its result is never read) and ``decoder_slots`` [rows] (each row's slot,
``enc_row * fold + slot``), so any number of beams per passage shares one call.

Self-attention reads a preallocated cache (:class:`SlotCache`): each row has its own length (``positions``),
and the positions past it are masked.
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


def causal_bias(new_len: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[new, new] additive bias among new tokens: query i sees new keys 0..i."""
    pos = torch.arange(new_len)
    return (pos[None, :] > pos[:, None]).to(dtype) * torch.finfo(dtype).min


def _scores(q, k, scale: float | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))
    return scores if scale is None else scores * scale  # scaled after the product, as transformers does


def folded_cross_attention(q, k, v, enc_bias, scale: float | None, cross_query_rows, decoder_slots) -> torch.Tensor:
    """q [rows, H, t, d]; k/v [enc_rows, H, src, d]; enc_bias [enc_rows, 1, 1, src]; the row maps above."""
    rows, heads, t, dim = q.shape
    enc_rows, fold = cross_query_rows.shape[0], cross_query_rows.shape[1]
    qf = q.index_select(0, cross_query_rows.reshape(-1))  # an empty slot reads any row; its output is dropped
    qf = qf.reshape(enc_rows, fold, heads, t, dim).transpose(1, 2).reshape(enc_rows, heads, fold * t, dim)
    scores = _scores(qf, k, scale) + enc_bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    out = out.reshape(enc_rows, heads, fold, t, dim).transpose(1, 2).reshape(enc_rows * fold, heads, t, dim)
    return out.index_select(0, decoder_slots)


def split_layers(tensors: tuple[torch.Tensor, ...], layers: int) -> tuple[list[torch.Tensor], ...]:
    """The decoder graph's per-layer inputs, in the spec's order: past keys, past values, cross keys and
    cross values, one list of ``layers`` tensors each."""
    if len(tensors) != 4 * layers:
        raise TypeError(f"the decoder takes 4 x {layers} per-layer tensors, got {len(tensors)}")
    return tuple(list(tensors[i * layers : (i + 1) * layers]) for i in range(4))


class SlotCache:
    """The self-attention cache of one decoder call over rows of different lengths.

    Each layer's past ``[past_rows, H, width, d]`` is read from the runtime's slot buffer; row ``i``
    continues past row ``beam_idx[i]`` (the beam reorder, and the rows that left or joined since the last
    call) and has ``positions[i]`` valid positions, the rest masked. The new tokens' keys and values are
    attended beside the past (causally among themselves) without being concatenated to it: the graph returns
    the gathered past (``present_*``, the runtime's next slot buffer) and the new keys and values
    (``new_*``), which the runtime writes at each row's position.
    """

    def __init__(self, past_keys: list[torch.Tensor], past_values: list[torch.Tensor], beam_idx: torch.Tensor,
                 positions: torch.Tensor, heads: int, new_len, dtype: torch.dtype, past_position_bias=None,
                 new_position_bias=None):
        self._past_k = [k.index_select(0, beam_idx) for k in past_keys]
        self._past_v = [v.index_select(0, beam_idx) for v in past_values]
        self.width = past_keys[0].shape[2]
        rows = positions.shape[0]
        valid = torch.arange(self.width)[None, :] < positions[:, None]
        past = ((~valid).to(dtype) * torch.finfo(dtype).min)[:, None, None, :]  # [rows, 1, 1, width]
        new = causal_bias(new_len, dtype)[None, None]  # [1, 1, t, t]
        if past_position_bias is not None:  # T5: [rows, H, t, width] and [1, H, t, t]
            past, new = past + past_position_bias, new + new_position_bias
        # One bias for all layers, over the past then the new keys (scores are concatenated the same way).
        self.bias = torch.cat([past.expand(rows, -1, new_len, -1), new.expand(rows, -1, -1, -1)], dim=-1)
        self._heads = heads
        self._new_k: list[torch.Tensor] = []
        self._new_v: list[torch.Tensor] = []

    def attend(self, layer: int, q, new_keys, new_values, scale: float | None):
        """Layer ``layer``'s attention of queries q [rows, H, t, d] over the row's past and the new
        [rows, t, H*d] keys and values."""
        k, v = split_heads(new_keys, self._heads), split_heads(new_values, self._heads)
        self._new_k.append(k)
        self._new_v.append(v)
        scores = torch.cat([torch.matmul(q, self._past_k[layer].transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))],
                           dim=-1)
        if scale is not None:
            scores = scores * scale  # scaled after the product, as transformers does
        p = torch.softmax(scores + self.bias, dim=-1)
        return torch.matmul(p[..., : self.width], self._past_v[layer]) + torch.matmul(p[..., self.width :], v)

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """The graph's ``present_keys.*``, ``present_values.*``, ``new_keys.*``, ``new_values.*``, in order."""
        return (*self._past_k, *self._past_v, *self._new_k, *self._new_v)
