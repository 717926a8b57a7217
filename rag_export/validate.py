"""Check each exported graph in onnxruntime against PyTorch: shapes first, then values."""

from __future__ import annotations

import logging

import numpy as np
import torch

from rag_runtime import constants as C
from rag_runtime.artifact import DecoderDims
from rag_runtime.decoding.rag import logsumexp
from rag_runtime.decoding.search import log_softmax, topk

from .errors import ValidationError

logger = logging.getLogger(__name__)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare(graph: str, names: list[str], ort_outputs, torch_outputs, atol: float) -> dict[str, float]:
    """Max abs difference per output; raises ValidationError on a shape mismatch or a violation."""
    diffs = {}
    for name, got, ref in zip(names, ort_outputs, torch_outputs, strict=True):
        ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        if got.shape != ref.shape:
            raise ValidationError(graph, f"{name} shape {got.shape} vs {ref.shape}", float("inf"), atol)
        diffs[name] = float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()) if got.size else 0.0
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > atol:
        raise ValidationError(graph, worst, diffs[worst], atol)
    return diffs


def _sample_ids(vocab: int, rows: int, length: int, seed: int, low: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, max(low + 1, min(vocab, 30000)), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):  # ragged rows, right-padded like the tokenizers pad
        mask[r, max(2, length - 3 * r):] = 0
    return ids, mask


def validate_encoder(graph: str, path, module, output_names, vocab: int, atol: float) -> dict[str, float]:
    ids, mask = _sample_ids(vocab, 3, 13, seed=1)
    with torch.no_grad():
        ref = module(ids, mask)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _session(path).run(output_names, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    return compare(graph, output_names, got, ref, atol)


def validate_generator_encoder(path, generator, dims: DecoderDims, atol: float) -> dict[str, float]:
    """The encoder states against PyTorch's encoder (the cross K/V are checked through the decoder)."""
    ids, mask = _sample_ids(dims.vocab, 2, 11, seed=2)
    (hidden,) = _session(path).run([C.ENCODER_HIDDEN_STATES], {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    with torch.no_grad():
        ref = generator.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)[0]
    return compare(C.GENERATOR_ENCODER, [C.ENCODER_HIDDEN_STATES], [hidden], [ref], atol)


def validate_generator_decoder(encoder_path, decoder_path, generator, dims: DecoderDims, decoder_start: int,
                               atol: float, steps: int = 5, beams: int = 2) -> dict[str, float]:
    """Encode with the exported encoder, then decode ``steps`` tokens one at a time with the KV cache and
    ``beams`` folded rows per context, and compare each step's logits with the PyTorch generator run on
    the whole prefix. From the third step on, the beams of each context swap places through ``beam_idx``
    (the cache reorder)."""
    enc, dec = _session(encoder_path), _session(decoder_path)
    ids, mask = _sample_ids(dims.vocab, 2, 11, seed=2)
    _, keys, values = enc.run(None, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    rows = ids.shape[0] * beams
    g = torch.Generator().manual_seed(3)
    dec_ids = torch.randint(5, max(6, min(dims.vocab, 30000)), (rows, steps), generator=g)
    dec_ids[:, 0] = decoder_start
    with torch.no_grad():
        ref_logits = generator(input_ids=ids.repeat_interleave(beams, 0),
                               attention_mask=mask.repeat_interleave(beams, 0),
                               decoder_input_ids=dec_ids).logits.numpy()
    shape = (dims.layers, rows, dims.heads, 0, dims.head_dim)
    kv_dtype = next(i.type for i in dec.get_inputs() if i.name == C.PAST_KEYS)
    past_k = past_v = np.zeros(shape, dtype=np.float16 if kv_dtype == "tensor(float16)" else np.float32)
    order = np.arange(rows)  # decoder row i continues reference row order[i]
    swap = np.arange(rows).reshape(-1, beams)[:, ::-1].reshape(-1)
    worst = 0.0
    for t in range(steps):
        beam_idx = swap if t >= 2 else np.arange(rows)
        order = order[beam_idx]
        logits, past_k, past_v = dec.run(None, {
            C.DECODER_INPUT_IDS: dec_ids[order, t : t + 1].numpy(), C.PAST_KEYS: past_k, C.PAST_VALUES: past_v,
            C.BEAM_IDX: beam_idx, C.CROSS_KEYS: keys, C.CROSS_VALUES: values,
            C.ENCODER_ATTENTION_MASK: mask.numpy(),
        })
        step = compare(C.GENERATOR_DECODER, [f"{C.LOGITS}[step {t}]"], [logits[:, 0]], [ref_logits[order, t]],
                       atol)
        worst = max(worst, *step.values())
    return {f"{C.LOGITS} ({steps} cached steps)": worst}


def validate_rag_token_head(path, vocab: int, atol: float) -> dict[str, float]:
    """The fused head against the runtime's host path (numpy marginalization, bans, top-k) on random
    logits: the same candidates in the same order, scores within ``atol``."""
    batch, n_docs, beams, keep = 2, 3, 2, 4
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((batch * n_docs * beams, 1, vocab)).astype(np.float32) * 4
    prior = log_softmax(rng.standard_normal((batch, n_docs)).astype(np.float32))
    beam_scores = rng.standard_normal((batch, beams)).astype(np.float32)
    lp = log_softmax(logits[:, 0].reshape(batch, n_docs, beams, vocab)) + prior[:, :, None, None]
    acc = log_softmax(logsumexp(lp, axis=1)) + beam_scores[:, :, None]
    banned = np.argsort(-acc.reshape(-1))[:3]  # ban the three best, so the ban is visible in the result
    acc = acc.reshape(-1).copy()
    acc[banned] = -np.inf
    acc = acc.reshape(batch, beams * vocab)
    ref_ids = topk(acc, keep)
    scores, ids = _session(path).run(None, {
        C.LOGITS: logits, C.DOC_LOGPRIOR: prior, C.BEAM_SCORES: beam_scores, C.BANNED: banned.astype(np.int64),
        C.TOP_K: np.array([keep], dtype=np.int64)})
    if not np.array_equal(ids, ref_ids):
        raise ValidationError(C.RAG_TOKEN_HEAD, f"{C.TOP_IDS} {ids.tolist()} vs {ref_ids.tolist()}", float("inf"),
                              atol)
    return compare(C.RAG_TOKEN_HEAD, [C.TOP_SCORES], [scores], [np.take_along_axis(acc, ref_ids, axis=1)], atol)
