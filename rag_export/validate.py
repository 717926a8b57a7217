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
VALIDATION_STEPS = 5


def decoder_check_name(steps: int = VALIDATION_STEPS) -> str:
    """The manifest's ``validation`` key of the decoder check."""
    return f"{C.LOGITS} ({steps} cached steps, mixed lengths, a join)"


DECODER_LOGITS = decoder_check_name()


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
                               tol: Tolerance, steps: int = VALIDATION_STEPS, beams: int = VALIDATION_BEAMS
                               ) -> dict[str, dict]:
    """Encode three contexts with the exported encoder, then decode ``steps`` tokens one at a time the way
    the runtime drives the decoder, and compare every row's logits at every step with the PyTorch generator
    run on that row's whole prefix: values against one tolerance for all steps, then decisions.

    Two "questions" share the calls: one reads contexts 0 and 1 with ``beams`` rows each from the first step,
    its beams swapping places through ``beam_idx`` from the third step on (the cache reorder); the other reads
    context 2 with one row and joins at the third step, so rows of different lengths, an empty query slot of
    the folded cross-attention and a join are all exercised. The cache is kept in slot buffers as the
    runtime keeps it: the gathered past comes back as ``present_*`` and the new keys are written at each
    row's position."""
    enc, dec = _session(encoder_path), _session(decoder_path)
    ids, mask = _sample_ids(dims.vocab, 3, 11, seed=2)
    cross_names = C.per_layer(dims.layers, C.CROSS_KEYS, C.CROSS_VALUES)
    past_names = C.per_layer(dims.layers, C.PAST_KEYS, C.PAST_VALUES)
    present_names = C.per_layer(dims.layers, C.PRESENT_KEYS, C.PRESENT_VALUES)
    new_names = C.per_layer(dims.layers, C.NEW_KEYS, C.NEW_VALUES)
    cross = enc.run(cross_names, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    g = torch.Generator().manual_seed(3)
    first_rows, late_start = 2 * beams, 2
    dec_ids = torch.randint(5, max(6, min(dims.vocab, 30000)), (first_rows + 1, steps), generator=g)
    dec_ids[:, 0] = decoder_start
    enc_of = np.array([r // beams for r in range(first_rows)] + [2])  # each reference row's context
    with torch.no_grad():
        ref_logits = generator(input_ids=ids[enc_of], attention_mask=mask[enc_of], decoder_input_ids=dec_ids).logits.numpy()
    kv_dtype = np.float16 if next(i.type for i in dec.get_inputs() if i.name == past_names[0]) == "tensor(float16)" \
        else np.float32
    past = [np.zeros((1, dims.heads, steps, dims.head_dim), dtype=kv_dtype)] * len(past_names)
    swap = np.arange(first_rows).reshape(-1, beams)[:, ::-1].reshape(-1)
    order = np.arange(first_rows)  # decoder row i of the first question continues reference row order[i]
    got, want = [], []
    for t in range(steps):
        late = t >= late_start
        rows = first_rows + late
        reorder = swap if t >= 2 else np.arange(first_rows)
        order = order[reorder]
        # Rows that join continue any row (their length is 0): the first call's past has a single row.
        first = reorder if t > 0 else np.zeros(first_rows, dtype=np.int64)
        beam_idx = np.concatenate([first, [first_rows if t > late_start else 0] if late else []]).astype(np.int64)
        ref_rows = np.concatenate([order, [first_rows] if late else []]).astype(np.int64)
        positions = np.array([t] * first_rows + ([t - late_start] if late else []), dtype=np.int64)
        tokens = dec_ids[ref_rows, positions].numpy()[:, None]
        slots = np.zeros((3, beams), dtype=np.int64)  # empty slots read row 0; their results are dropped
        slots[:2] = np.arange(first_rows).reshape(2, beams)
        if late:
            slots[2, 0] = first_rows
        decoder_slots = np.array([r for r in range(first_rows)] + ([2 * beams] if late else []), dtype=np.int64)
        wanted = [C.LOGITS, *present_names, *new_names]
        out = dict(zip(wanted, dec.run(wanted, {
            C.DECODER_INPUT_IDS: tokens, C.POSITIONS: positions, C.BEAM_IDX: beam_idx, C.CROSS_QUERY_ROWS: slots,
            C.DECODER_SLOTS: decoder_slots, C.ENCODER_ATTENTION_MASK: mask.numpy(),
            **dict(zip(past_names, past, strict=True)), **dict(zip(cross_names, cross, strict=True))}), strict=True))
        logits = out[C.LOGITS]
        if logits.shape != (rows, 1, dims.vocab):
            raise ValidationError(C.GENERATOR_DECODER, f"{C.LOGITS}[step {t}]",
                                  f"has shape {logits.shape}, expected {(rows, 1, dims.vocab)}")
        present, new = [out[n] for n in present_names], [out[n] for n in new_names]
        for buf, kv in zip(present, new, strict=True):
            buf[np.arange(rows), :, positions] = kv[:, :, 0]
        past = present
        got.append(logits[:, 0])
        want.append(ref_logits[ref_rows, positions])
    name = decoder_check_name(steps)
    got, want = np.concatenate(got), np.concatenate(want)
    figures = check_values(C.GENERATOR_DECODER, name, got, want, tol)
    figures["decisions"] = check_decisions(C.GENERATOR_DECODER, name, got, want, 2 * beams, tol, figures["tolerance"])
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
    scores, ids = _session(path).run([C.TOP_SCORES, C.TOP_IDS], {
        C.LOGITS: logits, C.DOC_LOGPRIOR: prior, C.BEAM_SCORES: beam_scores, C.BANNED: banned.astype(np.int64),
        C.TOP_K: np.array([keep], dtype=np.int64)})
    if not np.array_equal(ids, ref_ids):
        raise ValidationError(C.RAG_TOKEN_HEAD, C.TOP_IDS, f"ranks {ids.tolist()}, the host path {ref_ids.tolist()}")
    return {C.TOP_SCORES: check_values(C.RAG_TOKEN_HEAD, C.TOP_SCORES, scores,
                                       np.take_along_axis(acc, ref_ids, axis=1), tol)}


def validate_beam_step(path, vocab: int, tol: Tolerance) -> dict[str, dict]:
    """RAG-Sequence's beam step against the runtime's host path (numpy log_softmax, bans, top-k) on random
    logits: the same candidates in the same order, scores within tolerance."""
    groups, beams, keep = 3, 2, 4
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((groups * beams, 1, vocab)).astype(np.float32) * 4
    beam_scores = rng.standard_normal((groups, beams)).astype(np.float32)
    acc = (log_softmax(logits[:, 0]).reshape(groups, beams, vocab) + beam_scores[:, :, None]).reshape(-1)
    banned = np.argsort(-acc)[:3]  # ban the three best, so the ban is visible in the result
    acc[banned] = -np.inf
    acc = acc.reshape(groups, beams * vocab)
    ref_ids = topk(acc, keep)
    scores, ids = _session(path).run(None, {
        C.LOGITS: logits, C.BEAM_SCORES: beam_scores, C.BANNED: banned.astype(np.int64),
        C.TOP_K: np.array([keep], dtype=np.int64)})
    if not np.array_equal(ids, ref_ids):
        raise ValidationError(C.BEAM_STEP, C.TOP_IDS, f"ranks {ids.tolist()}, the host path {ref_ids.tolist()}")
    return {C.TOP_SCORES: check_values(C.BEAM_STEP, C.TOP_SCORES, scores, np.take_along_axis(acc, ref_ids, axis=1),
                                       tol)}


def validate_sequence_scorer(path, vocab: int, tol: Tolerance) -> dict[str, dict]:
    """The scorer against numpy's log_softmax (what the runtime computes without it) on random logits."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((4, 6, vocab)) * 4).astype(np.float32)
    labels = rng.integers(0, vocab, (4, 6)).astype(np.int64)
    lp = log_softmax(logits)
    picked, sums = _session(path).run([C.LABEL_LOGPROBS, C.LOGPROB_SUMS], {C.LOGITS: logits, C.LABELS: labels})
    return {C.LABEL_LOGPROBS: check_values(C.SEQUENCE_SCORER, C.LABEL_LOGPROBS, picked,
                                           np.take_along_axis(lp, labels[:, :, None], axis=2)[:, :, 0], tol),
            C.LOGPROB_SUMS: check_values(C.SEQUENCE_SCORER, C.LOGPROB_SUMS, sums, lp.sum(axis=2), tol)}
