"""Parity grid: rag_runtime against transformers' RAG generate, token ids identical, scores close.

Every case uses explicit parameters on both sides (or none on both, for the defaults case) and checks
that the reference output is not degenerate, so a broken runtime cannot pass by agreeing on noise.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import COMBOS
from support import assert_not_degenerate, reference_tokens, special_ids

RTOL = 1e-4

# Parameters shared by every (kind, generator) combination.
GRID = {
    "defaults": {},
    "greedy": dict(num_beams=1, max_length=12),
    "beam4": dict(num_beams=4, max_length=15),
    "return3": dict(num_beams=4, num_return_sequences=3, max_length=12),
    "n_docs3": dict(num_beams=2, n_docs=3, max_length=10),
    "min_length": dict(num_beams=3, min_length=9, max_length=12),
    "no_repeat2": dict(num_beams=3, no_repeat_ngram_size=2, max_length=14),
    "length_penalty0.3": dict(num_beams=3, length_penalty=0.3, max_length=14, early_stopping=False),
    "length_penalty2": dict(num_beams=3, length_penalty=2.0, max_length=14),
    "early_never": dict(num_beams=3, early_stopping="never", max_length=12),
    "repetition": dict(num_beams=2, repetition_penalty=1.5, max_length=12, no_repeat_ngram_size=0),
    "greedy_min_length": dict(num_beams=1, min_length=6, max_length=10, no_repeat_ngram_size=3),
    # Both a length and a count of new tokens: the count takes precedence (see _reference_params).
    "new_tokens": dict(num_beams=2, max_length=30, max_new_tokens=9, min_length=2, min_new_tokens=5),
    "greedy_new_tokens": dict(num_beams=1, max_new_tokens=7, min_new_tokens=4),
    "decoder_start": dict(num_beams=2, max_length=10, decoder_start_token_id=5),
    "no_cache": dict(num_beams=2, max_length=10, use_cache=False),
}
SEQUENCE_ONLY = {
    "no_dedup": dict(num_beams=2, do_deduplication=False, num_return_sequences=3, max_length=10),
    "return_many": dict(num_beams=2, num_return_sequences=5, max_length=10),
}
CASES = [(kind, gen, name) for kind, gen in COMBOS for name in GRID] + [
    (kind, gen, name) for kind, gen in COMBOS if kind == "sequence" for name in SEQUENCE_ONLY
]


def _params(name: str) -> dict:
    return dict(GRID[name] if name in GRID else SEQUENCE_ONLY[name])


def reference_params(kind: str, params: dict) -> dict:
    """What the reference needs to be asked for ``params`` to mean what generate() documents.

    transformers 5.x's ``RagTokenForGeneration.generate`` skips generate()'s length preparation: it ignores
    ``max_new_tokens`` (and generates to ``max_length``) and applies ``min_new_tokens`` beside ``min_length``
    instead of in its place. The runtime follows the documented precedence for both RAG kinds (README:
    reference behaviour), so RAG-Token's reference is given the lengths those counts stand for (the start
    token is the one token before the new ones). RAG-Sequence's reference runs generate() itself.
    """
    params = dict(params)
    if kind == "token":
        for count, length in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            if count in params:
                params[length] = 1 + params.pop(count)
    return params


@pytest.mark.parametrize(("kind", "generator", "case"), CASES, ids=[f"{k}-{g}-{c}" for k, g, c in CASES])
def test_generate_matches_transformers(bundles, questions, kind, generator, case):
    bundle = bundles[(kind, generator)]
    qs = [questions[0], questions[7], questions[13]]  # different lengths, padded together
    assert len({len(q.split()) for q in qs}) == 3
    params = _params(case)
    ref = bundle.reference.generate(qs, **reference_params(kind, params))
    got = bundle.pipeline.generate(qs, **params)
    defaults = bundle.pipeline.manifest.generation_defaults
    eos, pad = special_ids(bundle.pipeline)
    assert_not_degenerate([r.sequences for r in ref], eos | {pad, defaults.decoder_start_token_id})
    if "decoder_start_token_id" in params:
        assert all(row[0] == params["decoder_start_token_id"] for r in ref for row in r.sequences)

    assert len(got) == len(qs)
    for q, r, g in zip(qs, ref, got, strict=True):
        assert g.question == q
        assert [d.id for d in g.docs] == r.doc_ids.tolist()
        np.testing.assert_allclose([d.score for d in g.docs], r.doc_scores, rtol=RTOL, atol=1e-5)
        # Scores in the message tell a decoding bug from a float near-tie (two candidates within ~1e-5).
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences], (
            f"{q!r}: runtime scores {[a.score for a in g.answers]}, reference scores {r.scores}"
        )
        if r.scores is not None:
            np.testing.assert_allclose([a.score for a in g.answers], r.scores, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_optimized_export_matches_transformers(bundles, questions, tmp_path, kind, generator):
    """`--optimize` (onnxruntime's fusions) changes float rounding, not answers."""
    import json

    import onnx

    from rag_export import export
    from rag_runtime import RagPipeline
    from rag_runtime import constants as C

    bundle = bundles[(kind, generator)]
    out = export(str(bundle.checkpoint), tmp_path / "optimized", optimize=True)
    assert json.loads((out / C.MANIFEST_FILE).read_text())["optimized"] is True
    ops = {n.op_type for n in onnx.load(str(out / C.GENERATOR_DECODER_FILE)).graph.node}
    assert ops & {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}, ops
    qs = questions[2:8]
    params = dict(num_beams=3, max_length=12, n_docs=5)
    ref = bundle.reference.generate(qs, **params)
    got = RagPipeline.load(out).generate(qs, **params)
    defaults = bundle.pipeline.manifest.generation_defaults
    eos, pad = special_ids(bundle.pipeline)
    assert_not_degenerate([r.sequences for r in ref], eos | {pad, defaults.decoder_start_token_id})
    for r, g in zip(ref, got, strict=True):
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_from_context_matches_transformers(bundles, questions, kind, generator, num_beams):
    """The user-supplied contexts path: the very array transformers returns, padding included."""
    import torch

    bundle = bundles[(kind, generator)]
    ref = bundle.reference
    qs = questions[20:22]
    enc = ref.encode(qs)
    with torch.no_grad():
        hidden = ref.model.question_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0]
        docs = ref.retriever(enc.input_ids, hidden.numpy(), prefix=getattr(ref.model.generator.config, "prefix", None),
                             n_docs=ref.model.config.n_docs, return_tensors="pt")
        doc_scores = torch.bmm(hidden.unsqueeze(1), docs["retrieved_doc_embeds"].float().transpose(1, 2)).squeeze(1)
        # RagSequenceForGeneration's rescoring forward ignores a non-default n_docs here (it asserts), so the
        # contexts carry the configured n_docs.
        params = dict(num_beams=num_beams, max_length=11, n_docs=ref.model.config.n_docs, num_return_sequences=1,
                      no_repeat_ngram_size=2)
        expected = ref.model.generate(context_input_ids=docs["context_input_ids"],
                                      context_attention_mask=docs["context_attention_mask"],
                                      doc_scores=doc_scores, **params).numpy()
    got = bundle.pipeline.generate_from_context(docs["context_input_ids"].numpy(),
                                                docs["context_attention_mask"].numpy(), doc_scores.numpy(), **params)
    eos, pad = special_ids(bundle.pipeline)
    assert_not_degenerate([expected], eos | {pad})
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_retrieve_matches_retriever(bundles, questions, kind, generator):
    bundle = bundles[(kind, generator)]
    qs = questions[:4]
    doc_ids, doc_scores = bundle.reference.retrieve(qs, n_docs=6)
    got = bundle.pipeline.retrieve(qs, n_docs=6)
    for docs, ids, scores in zip(got, doc_ids, doc_scores, strict=True):
        assert [d.id for d in docs] == ids.tolist()
        np.testing.assert_allclose([d.score for d in docs], scores, rtol=RTOL, atol=1e-5)
        assert all(d.text for d in docs)


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_suppressed_tokens_match_transformers(bundles, questions, kind, generator):
    """suppress_tokens and begin_suppress_tokens, chosen among the tokens the unsuppressed answers use, so
    that suppressing them changes the answers."""
    bundle = bundles[(kind, generator)]
    qs = questions[4:7]
    base = dict(num_beams=2, max_length=10)
    eos, pad = special_ids(bundle.pipeline)
    defaults = bundle.pipeline.manifest.generation_defaults
    begin = 2 if defaults.forced_bos_token_id is not None else 1  # transformers suppresses after a forced BOS
    plain = bundle.pipeline.generate(qs, **base)
    firsts = Counter(a.token_ids[begin] for r in plain for a in r.answers if len(a.token_ids) > begin)
    later = Counter(t for r in plain for a in r.answers for t in a.token_ids[begin + 1 :] if t not in eos | {pad})
    params = dict(base, begin_suppress_tokens=[firsts.most_common(1)[0][0]],
                  suppress_tokens=[later.most_common(1)[0][0]])
    ref = bundle.reference.generate(qs, **params)
    got = bundle.pipeline.generate(qs, **params)
    assert [[a.token_ids for a in r.answers] for r in got] != [[a.token_ids for a in r.answers] for r in plain]
    for r, g in zip(ref, got, strict=True):
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]
        if r.scores is not None:
            np.testing.assert_allclose([a.score for a in g.answers], r.scores, rtol=RTOL, atol=1e-5)
