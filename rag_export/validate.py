"""Check each exported graph in onnxruntime against PyTorch on sample inputs (see :mod:`rag_export.judge`
for how outputs are judged). Each validator returns ``{output: figures}``."""

from __future__ import annotations

import numpy as np
import torch

from rag_runtime import constants as C
from rag_runtime.artifact import DecoderDims
from rag_runtime.decoding.rag import logsumexp
from rag_runtime.decoding.search import log_softmax, topk

from .errors import ValidationError
from .judge import Tolerance, check_decisions, check_values

VALIDATION_BEAMS = 2  # beams folded per context in the decoder check; decisions compare the top 2 x beams


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _numpy(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _sample_ids(vocab: int, rows: int, length: int, seed: int, low: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, max(low + 1, min(vocab, 30000)), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):  # ragged rows, right-padded like the tokenizers pad
        mask[r, max(2, length - 3 * r):] = 0
    return ids, mask


def validate_encoder(graph: str, path, module, output_names, vocab: int, tol: Tolerance) -> dict[str, dict]:
    ids, mask = _sample_ids(vocab, 3, 13, seed=1)
    with torch.no_grad():
        ref = module(ids, mask)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _session(path).run(output_names, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    return {name: check_values(graph, name, g, _numpy(r), tol) for name, g, r in zip(output_names, got, ref, strict=True)}


def validate_generator_encoder(path, generator, dims: DecoderDims, tol: Tolerance) -> dict[str, dict]:
    """The encoder states against PyTorch's encoder (the cross K/V are checked through the decoder)."""
    ids, mask = _sample_ids(dims.vocab, 2, 11, seed=2)
    (hidden,) = _session(path).run([C.ENCODER_HIDDEN_STATES], {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    with torch.no_grad():
        ref = generator.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)[0]
    return {C.ENCODER_HIDDEN_STATES: check_values(C.GENERATOR_ENCODER, C.ENCODER_HIDDEN_STATES, hidden, _numpy(ref),
                                                  tol)}


def validate_generator_decoder(encoder_path, decoder_path, generator, dims: DecoderDims, decoder_start: int,
                               tol: Tolerance, steps: int = 5, beams: int = VALIDATION_BEAMS) -> dict[str, dict]:
    """Encode with the exported encoder, then decode ``steps`` tokens one at a time with the KV cache and
    ``beams`` folded rows per context, and compare the logits of every step with the PyTorch generator run
    on the whole prefix: values against one tolerance for all steps, then decisions. From the third step
    on, the beams of each context swap places through ``beam_idx`` (the cache reorder)."""
    enc, dec = _session(encoder_path), _session(decoder_path)
    ids, mask = _sample_ids(dims.vocab, 2, 11, seed=2)
    cross = enc.run(None, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})[1:]
    cross_names = C.per_layer(dims.layers, C.CROSS_KEYS, C.CROSS_VALUES)
    past_names = C.per_layer(dims.layers, C.PAST_KEYS, C.PAST_VALUES)
    rows = ids.shape[0] * beams
    g = torch.Generator().manual_seed(3)
    dec_ids = torch.randint(5, max(6, min(dims.vocab, 30000)), (rows, steps), generator=g)
    dec_ids[:, 0] = decoder_start
    with torch.no_grad():
        ref_logits = generator(input_ids=ids.repeat_interleave(beams, 0),
                               attention_mask=mask.repeat_interleave(beams, 0),
                               decoder_input_ids=dec_ids).logits.numpy()
    kv_dtype = next(i.type for i in dec.get_inputs() if i.name == past_names[0])
    past = [np.zeros((rows, dims.heads, 0, dims.head_dim), dtype=np.float16 if kv_dtype == "tensor(float16)"
                     else np.float32)] * len(past_names)
    order = np.arange(rows)  # decoder row i continues reference row order[i]
    swap = np.arange(rows).reshape(-1, beams)[:, ::-1].reshape(-1)
    got, want = [], []
    for t in range(steps):
        beam_idx = swap if t >= 2 else np.arange(rows)
        order = order[beam_idx]
        logits, *past = dec.run(None, {
            C.DECODER_INPUT_IDS: dec_ids[order, t : t + 1].numpy(), C.BEAM_IDX: beam_idx,
            C.ENCODER_ATTENTION_MASK: mask.numpy(), **dict(zip(past_names, past, strict=True)),
            **dict(zip(cross_names, cross, strict=True)),
        })
        if logits.shape != (rows, 1, dims.vocab):
            raise ValidationError(C.GENERATOR_DECODER, f"{C.LOGITS}[step {t}]",
                                  f"has shape {logits.shape}, expected {(rows, 1, dims.vocab)}")
        got.append(logits[:, 0])
        want.append(ref_logits[order, t])
    name = f"{C.LOGITS} ({steps} cached steps)"
    figures = check_values(C.GENERATOR_DECODER, name, np.stack(got), np.stack(want), tol)
    figures["decisions"] = check_decisions(C.GENERATOR_DECODER, name, np.stack(got), np.stack(want), 2 * beams, tol,
                                           figures["tolerance"])
    return {name: figures}


def validate_rag_token_head(path, vocab: int, tol: Tolerance) -> dict[str, dict]:
    """The fused head against the runtime's host path (numpy marginalization, bans, top-k) on random
    logits: the same candidates in the same order, scores within tolerance."""
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
        raise ValidationError(C.RAG_TOKEN_HEAD, C.TOP_IDS, f"ranks {ids.tolist()}, the host path {ref_ids.tolist()}")
    return {C.TOP_SCORES: check_values(C.RAG_TOKEN_HEAD, C.TOP_SCORES, scores,
                                       np.take_along_axis(acc, ref_ids, axis=1), tol)}


def validate_sequence_scorer(path, vocab: int, tol: Tolerance) -> dict[str, dict]:
    """The scorer against numpy's log_softmax (what the runtime computes without it) on random logits."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((4, 6, vocab)) * 4).astype(np.float32)
    labels = rng.integers(0, vocab, (4, 6)).astype(np.int64)
    lp = log_softmax(logits)
    picked, sums = _session(path).run(None, {C.LOGITS: logits, C.LABELS: labels})
    return {C.LABEL_LOGPROBS: check_values(C.SEQUENCE_SCORER, C.LABEL_LOGPROBS, picked,
                                           np.take_along_axis(lp, labels[:, :, None], axis=2)[:, :, 0], tol),
            C.LOGPROB_SUMS: check_values(C.SEQUENCE_SCORER, C.LOGPROB_SUMS, sums, lp.sum(axis=2), tol)}
