"""The decode engine: questions that join and leave a running decode answer exactly as generate() answers
each of them alone (which the parity grids hold against transformers)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import COMBOS
from rag_runtime.engine import RowBudgetError

EXAMPLES = 12


@st.composite
def arrivals(draw) -> dict:
    """A RAG kind and generator, and 2-5 questions, each with its own options, arriving at random steps."""
    combo = draw(st.sampled_from(COMBOS))
    items = []
    for _ in range(draw(st.integers(2, 5))):
        beams = draw(st.integers(1, 4))
        n_docs = draw(st.integers(1, 5))
        most = beams if combo[0] == "token" else min(n_docs * beams, 4)
        params = dict(num_beams=beams, n_docs=n_docs, max_length=draw(st.integers(4, 14)),
                      min_length=draw(st.sampled_from([0, 3, 6])), no_repeat_ngram_size=draw(st.sampled_from([0, 2])),
                      num_return_sequences=draw(st.integers(1, most)),
                      length_penalty=draw(st.sampled_from([0.5, 1.0, 2.0])),
                      early_stopping=draw(st.sampled_from([True, False, "never"])))
        params["min_length"] = min(params["min_length"], params["max_length"])
        items.append(dict(step=draw(st.integers(0, 8)), question=draw(st.integers(0, 39)), params=params))
    cancel = draw(st.one_of(st.none(), st.integers(0, len(items) - 1)))
    return dict(combo=combo, items=items, cancel=cancel)


def _answers(result) -> list:
    return [a.token_ids for a in result.answers]


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=arrivals())
def test_questions_joining_and_leaving_answer_as_alone(bundles, questions, case):
    note(repr(case))
    pipe = bundles[case["combo"]].pipeline
    engine = pipe.engine(max_rows=10_000)
    items = sorted(case["items"], key=lambda it: it["step"])
    tickets, prepared, step = [None] * len(items), [None] * len(items), 0
    while step <= items[-1]["step"] or engine.busy:
        for i, it in enumerate(items):
            if it["step"] == step:
                prepared[i] = pipe.prepare([questions[it["question"]]], pipe.options(**it["params"]))[0]
                r = prepared[i].request
                tickets[i] = engine.add(r.decode, r.contexts, r.rescore_contexts)
        if step == 2 and case["cancel"] is not None and tickets[case["cancel"]] is not None:
            tickets[case["cancel"]].cancel()  # the others must not notice
        engine.step()
        step += 1
    assert not engine.busy and engine.active_rows == 0
    for i, (it, ticket) in enumerate(zip(items, tickets, strict=True)):
        if i == case["cancel"] and ticket.state == "cancelled":
            continue
        assert ticket.state == "done", (ticket.state, ticket.error)
        got = pipe.answer(prepared[i], ticket.result)
        alone = pipe.generate([questions[it["question"]]], **it["params"])[0]
        assert _answers(got) == _answers(alone), f"question {i} ({it}) answered differently beside others"
        np.testing.assert_allclose([a.score for a in got.answers], [a.score for a in alone.answers], rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_row_budget_queues_questions_and_refuses_what_never_fits(bundles, questions, kind, generator):
    pipe = bundles[(kind, generator)].pipeline
    opts = pipe.options(num_beams=2, n_docs=3, max_length=9)
    engine = pipe.engine(max_rows=7)  # one question (3 x 2 rows) at a time
    prepared = pipe.prepare(questions[:3], opts)
    tickets = [engine.add(p.request.decode, p.request.contexts, p.request.rescore_contexts) for p in prepared]
    most = 0
    while engine.busy:
        engine.step()
        most = max(most, engine.active_rows)
    assert most == 6 and all(t.state == "done" for t in tickets)
    alone = pipe.generate(questions[:3], num_beams=2, n_docs=3, max_length=9)
    assert [_answers(pipe.answer(p, t.result)) for p, t in zip(prepared, tickets, strict=True)] == [
        _answers(a) for a in alone]
    big = pipe.prepare(questions[:1], pipe.options(num_beams=4, n_docs=2))[0].request
    with pytest.raises(RowBudgetError, match=r"needs 8 decoder rows .* max_rows \(7\)"):
        engine.add(big.decode, big.contexts, big.rescore_contexts)


def test_stage_timer_counts_the_engine_work(bundles, questions):
    from rag_runtime import RagPipeline, StageTimer

    timer = StageTimer()
    pipe = RagPipeline.load(bundles[("sequence", "bart")].export, timer=timer)
    pipe.generate(questions[:2], num_beams=2, n_docs=3, max_length=8)
    v, steps = timer.values, timer.counts["decode"]
    assert steps > 0 and 6 * steps <= v["decode/rows"] <= 12 * steps  # 2 questions x 3 passages x 2 beams
    assert timer.counts["decode/onnxruntime/generator_decoder"] == steps
    assert timer.counts["rescore/onnxruntime/generator_decoder"] >= 1 and v["rescore/positions"] > 0
    assert v["generator_encode/rows"] == 2 * 3


def test_a_failed_step_fails_its_questions_and_the_engine_goes_on(bundles, questions):
    pipe = bundles[("token", "bart")].pipeline
    engine = pipe.engine(max_rows=100)
    p = pipe.prepare(questions[:1], pipe.options(num_beams=2, max_length=8))[0]
    ids, mask = p.request.contexts
    broken = engine.add(p.request.decode, (np.full_like(ids, 10**6), mask))  # ids beyond the vocabulary
    ended = engine.step()
    assert ended == [broken] and broken.state == "failed" and broken.error is not None
    assert not engine.busy
    p = pipe.prepare(questions[:1], pipe.options(num_beams=2, max_length=8))[0]
    ticket = engine.add(p.request.decode, p.request.contexts)
    engine.run()
    assert ticket.state == "done"
    assert _answers(pipe.answer(p, ticket.result)) == _answers(pipe.generate(questions[:1], num_beams=2,
                                                                               max_length=8)[0])
